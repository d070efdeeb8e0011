"""Data sets and filters for training: generated prompt sets and decontamination against benchmarks."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pippin.io import write_atomic, write_json_atomic

TRAIN_FILE, VALIDATION_FILE, MANIFEST_FILE = "train.jsonl", "validation.jsonl", "manifest.json"


def write_prompt_set(folder: str | Path, train: list[Any], validation: list[Any], manifest: dict[str, Any]) -> dict[str, Path]:
    """Write a generated prompt set: train.jsonl and validation.jsonl (one dataclass row per line) and manifest.json,
    each atomically, the manifest last (its presence marks a complete set)."""
    folder = Path(folder)
    paths = {"train": folder / TRAIN_FILE, "validation": folder / VALIDATION_FILE, "manifest": folder / MANIFEST_FILE}
    for key, rows in (("train", train), ("validation", validation)):
        write_atomic(paths[key], "".join(json.dumps(asdict(r)) + "\n" for r in rows).encode())
    write_json_atomic(paths["manifest"], manifest)
    return paths
