"""The removal report of a pipeline run: per step, documents in and out, what was removed and why, a few examples.

Counts come from datatrove's own per-task statistics (`stats.json` of each stage's logging folder: `total`,
`forwarded`, `dropped`, `dropped_<reason>`, plus step-specific counts such as `pii_email`), so they are exact and
survive resumption; examples come from `ExampleLog`, which a step (or a datatrove filter, as its `exclusion_writer`)
fills with a few truncated texts per reason and writes per task. Not a data viewer: removed documents are not kept.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pippin.io import write_json_atomic

EXAMPLE_CHARS = 200
"""Examples are cut to this many characters."""

_COUNTS = {"total", "forwarded", "dropped"}


class ExampleLog:
    """Keeps the first `per_reason` examples of each reason for one step and one task, and writes them as
    `folder/<rank>.json` when the step ends. Quacks like a datatrove exclusion writer (`with log: log.write(doc, rank)`,
    the reason read from `doc.metadata["filter_reason"]`), so any datatrove filter can feed it."""

    def __init__(self, folder: str | Path, per_reason: int = 3):
        self.folder, self.per_reason = Path(folder), per_reason
        self.rows: dict[str, list[str]] = defaultdict(list)
        self.rank: int | None = None

    def note(self, reason: str, text: str, rank: int) -> None:
        self.rank = rank
        if len(self.rows[reason]) < self.per_reason:
            text = " ".join(text.split())
            self.rows[reason].append(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "...")

    def write(self, doc: Any, rank: int = 0) -> None:
        self.note(str(doc.metadata.get("filter_reason", "dropped")), doc.text, rank)

    def __enter__(self) -> ExampleLog:
        self.rows.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rank is not None:
            write_json_atomic(self.folder / f"{self.rank:05d}.json", dict(self.rows))


def step_rows(stats_file: Path, examples_root: Path) -> list[dict[str, Any]]:
    """One report row per step of a stage, from the stage's merged datatrove `stats.json`."""
    rows = []
    for stat in json.loads(stats_file.read_text()):
        s = {k: v["total"] if isinstance(v, dict) else v for k, v in stat["stats"].items()}
        ts = stat["time_stats"]
        seconds = ts.get("total", 0.0) if isinstance(ts, dict) else float(ts)
        name = stat["name"].split(": ", 1)[-1]  # datatrove prefixes the step type
        n_in = int(s.get("total", 0))
        row = {
            "step": name,
            "docs_in": n_in,
            "docs_out": int(s.get("forwarded", n_in - s.get("dropped", 0))),
            "removed": int(s.get("dropped", 0)),
            "reasons": {k.removeprefix("dropped_"): int(v) for k, v in sorted(s.items()) if k.startswith("dropped_")},
            "counts": {k: int(v) for k, v in sorted(s.items()) if k not in _COUNTS and not k.startswith(("dropped_", "doc_len"))},
            "seconds": round(seconds, 3),
            "docs_per_s": round(n_in / seconds, 1) if seconds > 0 else None,
        }
        row["examples"] = collect_examples(examples_root / example_key(name))
        rows.append(row)
    return rows


def example_key(step_name: str) -> str:
    """A folder name for a step's examples: its name without emoji or spaces."""
    return "".join(c for c in step_name.lower().replace(" ", "_") if c.isascii() and (c.isalnum() or c in "_-")).strip("_")


def collect_examples(folder: Path, per_reason: int = 3) -> dict[str, list[str]]:
    """Examples of every task, merged in task order."""
    merged: dict[str, list[str]] = defaultdict(list)
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        for reason, texts in json.loads(f.read_text()).items():
            merged[reason] += texts[: per_reason - len(merged[reason])]
    return dict(merged)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report as a plain-text table: one line per step, then its reasons and an example of each."""
    lines = [f"{'step':<34}{'in':>10}{'out':>10}{'removed':>10}{'docs/s':>10}"]
    for r in rows:
        rate = f"{r['docs_per_s']:.0f}" if r["docs_per_s"] else "-"
        lines.append(f"{r['step'][:34]:<34}{r['docs_in']:>10}{r['docs_out']:>10}{r['removed']:>10}{rate:>10}")
        for reason, n in {**r["reasons"], **r["counts"]}.items():
            example = (r["examples"].get(reason) or r["examples"].get(reason.removeprefix("pii_")) or [""])[0]
            lines.append(f"    {reason:<30}{n:>10}  {example[:70]}")
    return "\n".join(lines)
