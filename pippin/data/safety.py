"""The harmlessness reward's prompt set: the train split of AdvBench and XSTest (pippin.eval.tasks.safety), never
their test split, each prompt with what a harmless reply does to it.

Rows are `{"id", "prompt", "expect": "refuse" | "comply", "source": "advbench" | "xstest"}`. AdvBench's goals and
XSTest's unsafe contrast prompts expect a refusal; XSTest's safe look-alikes expect an answer. The contrast prompts
share their wording with the safe ones ("kill a Python process" / "kill my neighbour"), so a policy cannot earn the
reward by refusing whatever sounds dangerous (Röttger et al. 2024). A small validation part of the train split (the
prompts whose split point is below TRAIN_FRACTION * val_fraction) is kept out of train.jsonl for curves during
training. The rows come in file order and the same sources give the same bytes. The reward itself is
pippin.train.harmless.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pippin.data import TRAIN_FILE, VALIDATION_FILE, write_prompt_set
from pippin.errors import PippinError
from pippin.eval.suite import Split
from pippin.eval.tasks.safety import (
    ADVBENCH_FILE,
    SPLIT_RULE,
    TRAIN_FRACTION,
    XSTEST_FILE,
    file_sha256,
    load_items,
    split_point,
)

VERSION = 1
"""Bumped whenever the same sources would give different rows."""
EXPECTS = ("refuse", "comply")
SOURCES = ("advbench", "xstest")


@dataclass(frozen=True, kw_only=True)
class SafetyPrompt:
    id: str
    """The suite's item id: "advbench/LINE" (the CSV line) or "xstest/ID" (XSTest's id column)."""
    prompt: str
    expect: str
    """"refuse" or "comply": what a harmless reply does."""
    source: str
    """"advbench" or "xstest"."""


@dataclass
class SafetyPromptSet:
    """The rows, split into train and validation, and a manifest that describes them."""

    train: list[SafetyPrompt]
    validation: list[SafetyPrompt]
    manifest: dict = field(default_factory=dict)


def _counts(rows: list[SafetyPrompt]) -> dict[str, int]:
    return dict(sorted(Counter(f"{r.source} {r.expect}" for r in rows).items()))


def build_safety_prompts(data_dir: str | Path, *, val_fraction: float = 0.1) -> SafetyPromptSet:
    """The train split of `data_dir`'s AdvBench and XSTest files as reward prompts; any malformed row is an error
    (a training set is not built around holes)."""
    if not 0 <= val_fraction < 1:
        raise PippinError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    data_dir = Path(data_dir)
    paths = [data_dir.joinpath(*ADVBENCH_FILE), data_dir.joinpath(*XSTEST_FILE)]
    for path in paths:
        if not path.is_file():
            raise PippinError(f"{path} does not exist; pass --data with the folder that holds advbench/ and xstest/.")
    every, errors = load_items(*paths, split=Split.ALL)
    if errors:
        raise PippinError("Malformed source rows: " + "; ".join(f"{e.item}: {e.message}" for e in errors))
    items = [it for it in every if it.split is Split.TRAIN]
    rows = [
        SafetyPrompt(
            id=it.id,
            prompt=it.prompt,
            expect="comply" if it.group == "xstest safe" else "refuse",
            source=it.group.split()[0],
        )
        for it in items
    ]
    if len({r.prompt for r in rows}) != len(rows):
        twice = [p for p, n in Counter(r.prompt for r in rows).items() if n > 1]
        raise PippinError(f"Prompts appear more than once in the sources: {twice[:3]}; a prompt must have one expectation.")
    cut = TRAIN_FRACTION * val_fraction
    train = [r for r in rows if split_point(r.prompt) >= cut]
    validation = [r for r in rows if split_point(r.prompt) < cut]
    categories = {it.category for it in items if it.category}
    by_category = Counter((it.category, split_point(it.prompt) < cut) for it in items if it.category)
    manifest = {
        "generator": "pippin.data.safety",
        "version": VERSION,
        "split_rule": SPLIT_RULE,
        "validation_rule": f"train-split prompts with split point < {TRAIN_FRACTION} * {val_fraction}",
        "val_fraction": val_fraction,
        "n_train": len(train),
        "n_validation": len(validation),
        "counts": {
            "train": _counts(train),
            "validation": _counts(validation),
            "held-out test split (never written)": dict(Counter(it.group for it in every if it.split is Split.TEST)),
        },
        "xstest_types": {c: {"train": by_category[c, False], "validation": by_category[c, True]} for c in sorted(categories)},
        "sources": {
            "/".join(parts): {"sha256": file_sha256(path)} for parts, path in zip((ADVBENCH_FILE, XSTEST_FILE), paths, strict=True)
        },
        "files": {"train": TRAIN_FILE, "validation": VALIDATION_FILE},
    }
    return SafetyPromptSet(train=train, validation=validation, manifest=manifest)


def write_safety_prompts(folder: str | Path, prompt_set: SafetyPromptSet) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl and manifest.json, each atomically, the manifest last."""
    return write_prompt_set(folder, prompt_set.train, prompt_set.validation, prompt_set.manifest)
