"""Reports: a suite's result as JSON, as a Markdown page with a bar chart comparing systems, and as a terminal table.

`write_report` writes `results.json` (everything, per-item records included), `report.md` (settings, the
metrics table with one column per system, error counts and the first errors, notes) and `<suite>.png` (the
headline metrics of every system side by side, e.g. full vs 3.5 bpw vs 3.5 bpw + recovery adapter). All files
are written atomically. matplotlib is a benchmark extra, imported only here and only when plotting; without it
the report says so instead of failing. `merge_results` joins saved results of one suite from separate runs.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pippin.errors import PippinError
from pippin.eval.suite import ItemError, SuiteResult
from pippin.io import write_atomic, write_json_atomic

MAX_ERRORS_SHOWN = 20


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool | int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def metric_names(result: SuiteResult) -> list[str]:
    """Headline metrics first, then the others in the order they first appear."""
    names = list(result.headline)
    for row in result.metrics.values():
        names += [k for k in row if k not in names]
    return names


def table(result: SuiteResult) -> str:
    """The metrics as a plain-text table, one column per system."""
    rows = list(result.metrics)
    names = metric_names(result)
    width = max([len(n) for n in names] + [6])
    cols = [max(len(r), 8) for r in rows]
    lines = [f"{result.suite}: " + ", ".join(f"{k} {v}" for k, v in result.error_counts().items()) if result.errors else result.suite]
    lines.append(" " * width + "".join(f"  {r:>{c}}" for r, c in zip(rows, cols)))
    for n in names:
        lines.append(f"{n:<{width}}" + "".join(f"  {_fmt(result.metrics[r].get(n)):>{c}}" for r, c in zip(rows, cols)))
    return "\n".join(lines)


def markdown(result: SuiteResult, *, plot: str | None = None) -> str:
    s = result.settings
    out = [f"# pippin eval: {result.suite}", ""]
    for key in ("systems", "against", "judge", "limit", "split"):
        if s.get(key) not in (None, []):
            value = ", ".join(f"`{x}`" for x in s[key]) if isinstance(s[key], list) else f"`{s[key]}`"
            out.append(f"- **{key}**: {value}")
    out += ["", "## Results", "", "| metric | " + " | ".join(f"`{r}`" for r in result.metrics) + " |"]
    out.append("|---|" + "---:|" * len(result.metrics))
    for n in metric_names(result):
        out.append(f"| {n} | " + " | ".join(_fmt(row.get(n)) for row in result.metrics.values()) + " |")
    if plot:
        out += ["", f"![{result.suite}]({plot})"]
    out += ["", "## Errors", ""]
    if not result.errors:
        out.append("None: every item was scored.")
    else:
        out.append("Items with errors are left out of every metric (never counted as a pass or a fail).")
        out += ["", "| stage / system | items |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in result.error_counts().items()]
        out += [""] + [
            f"- {e.stage} `{e.item}`" + (f" [{e.system}]" if e.system else "") + f": {e.message}" for e in result.errors[:MAX_ERRORS_SHOWN]
        ]
        if len(result.errors) > MAX_ERRORS_SHOWN:
            out.append(f"- ... and {len(result.errors) - MAX_ERRORS_SHOWN} more in results.json")
    if result.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    out += ["", "## Settings", "", "```json", json.dumps(s, indent=2, default=str), "```", ""]
    return "\n".join(out)


def plot_png(result: SuiteResult) -> bytes | None:
    """A grouped bar chart of the headline metrics (one bar per system), as PNG bytes; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    # numeric headline metrics only: a verdict such as the gate's "pass" / "fail" is in the tables, not a bar
    names = [
        n
        for n in result.headline
        if any(row.get(n) is not None for row in result.metrics.values())
        and all(row.get(n) is None or number(row.get(n)) for row in result.metrics.values())
    ]
    if not names or not result.metrics:
        return None
    rows = list(result.metrics)
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) + 1), 3.8 + 0.2 * ((len(rows) - 1) // 3)), dpi=120)
    for k, row in enumerate(rows):
        values = [result.metrics[row].get(n) for n in names]
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [v if v is not None else 0 for v in values], width, label=row)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"pippin eval: {result.suite}", fontsize=10)
    ax.margins(y=0.12)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(rows)), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(result: SuiteResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write results.json, report.md and (if plotting works) <suite>.png into `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    png = plot_png(result) if plots else None
    if png is not None:
        paths["plot"] = out / f"{result.suite}.png"
        write_atomic(paths["plot"], png)
    elif plots and result.metrics:
        result.notes.append("No plot: matplotlib is not installed (pip install matplotlib, or the bench extra), or nothing was scored.")
    write_json_atomic(paths["json"], result.to_json())
    write_atomic(paths["markdown"], markdown(result, plot=paths["plot"].name if "plot" in paths else None).encode())
    return paths


def load_result(path: str | Path) -> SuiteResult:
    """A SuiteResult back from a results.json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        errors = [ItemError(**e) for e in data.get("errors", [])]
        return SuiteResult(
            suite=data["suite"],
            metrics=data["metrics"],
            headline=data["headline"],
            settings=data.get("settings", {}),
            items=data.get("items", []),
            errors=errors,
            notes=data.get("notes", []),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PippinError(f"{path} is not a pippin eval results.json ({e}); pass files written by `pippin eval`.") from None


def merge_results(results: Sequence[SuiteResult]) -> SuiteResult:
    """One result with every row of several runs of the same suite (a row seen twice keeps the later run)."""
    if not results:
        raise PippinError("Nothing to merge; pass at least one results.json.")
    suites = {r.suite for r in results}
    if len(suites) > 1:
        raise PippinError(f"Cannot merge results of different suites ({', '.join(sorted(suites))}); merge one suite at a time.")
    merged = SuiteResult(suite=results[0].suite, metrics={}, headline=list(results[0].headline), settings={"merged_from": []})
    for r in results:
        merged.metrics |= r.metrics
        merged.headline += [h for h in r.headline if h not in merged.headline]
        merged.settings["merged_from"].append(r.settings)
        merged.items += r.items
        merged.errors += r.errors
        merged.notes += [n for n in r.notes if n not in merged.notes]
    merged.settings["systems"] = list(merged.metrics)
    return merged
