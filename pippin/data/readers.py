"""Read the pipeline's inputs as datatrove documents: JSONL rows with a `text` field (the crawler's rows: `url`, `text`,
`fetched_at`, `status`) and plain-text files, given as files or folders, gzipped or not.

Files are listed once, sorted, and cut into `world_size` contiguous runs balanced by size, so task r reads run r and
the tasks' outputs, taken in task order, follow the input order. A document's id is `<file>:<line>` (JSONL) or
`<file>:<part>` (text), stable across runs. Not read: WARC (run the crawler's extractor first), HTML, PDF.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from pippin.errors import PippinError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".rst", ".text")


def list_inputs(paths: list[str | Path]) -> list[Path]:
    """Every readable file under `paths` (files are taken as they are, folders searched), sorted, without repeats."""
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files |= {f for f in p.rglob("*") if f.is_file() and f.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)}
        else:
            raise PippinError(f"input {p} does not exist; give JSONL or text files, or folders of them")
    return sorted(files)


def split_by_size(files: list[Path], world_size: int) -> list[list[Path]]:
    """Contiguous runs of `files`, one per task, each close to an equal share of the bytes."""
    sizes = [f.stat().st_size for f in files]
    total, runs, acc = sum(sizes) or 1, [[] for _ in range(world_size)], 0
    for f, size in zip(files, sizes):
        # the task whose share holds this file's midpoint
        runs[min(world_size - 1, int((acc + size / 2) * world_size / total))].append(f)
        acc += size
    return runs


def _open(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8", errors="replace") if path.suffix == ".gz" else path.open(encoding="utf-8", errors="replace")
    )


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` cut at blank lines into parts of at most about `max_chars` (a paragraph longer than that stays whole);
    0 keeps it whole."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    parts, cur, n = [], [], 0
    for para in text.split("\n\n"):
        if cur and n + len(para) > max_chars:
            parts.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += len(para) + 2
    return parts + ["\n\n".join(cur)] if cur else parts


class InputReader(PipelineStep):
    """Yields the documents of task `rank`'s run of input files. Rows without a string `text` are counted
    (`bad_rows`) and skipped; blank texts are skipped."""

    type = "📖 - READER"
    name = "📖 Read inputs"

    def __init__(self, paths: list[str], split_chars: int = 0, text_key: str = "text"):
        super().__init__()
        self.paths, self.split_chars, self.text_key = list(paths), split_chars, text_key

    def read_file(self, f: Path) -> Iterator[Document]:
        name = str(f)
        with _open(f) as fh:
            if f.name.endswith(JSONL_SUFFIXES):
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        row = None
                    if not isinstance(row, dict) or not isinstance(row.get(self.text_key), str):
                        self.stat_update("bad_rows")
                        continue
                    meta = {k: v for k, v in row.items() if k != self.text_key and isinstance(v, str | int | float)}
                    for j, part in enumerate(split_text(row[self.text_key], self.split_chars)):
                        yield Document(text=part, id=f"{name}:{i}" + (f".{j}" if j else ""), metadata={**meta, "source": name})
            else:
                for j, part in enumerate(split_text(fh.read(), self.split_chars)):
                    yield Document(text=part, id=f"{name}:{j}", metadata={"source": name})

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for f in split_by_size(list_inputs(self.paths), world_size)[rank]:
            for doc in self.read_file(f):
                if not doc.text.strip():
                    continue
                self.stat_update("total")
                self.update_doc_stats(doc)
                yield doc
