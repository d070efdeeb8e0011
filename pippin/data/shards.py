"""Tokenized, memory-mapped shards: what the data pipeline writes and the pretraining trainer reads.

A shard folder holds raw little-endian token files (`shard-00000.bin`, ...; uint16 when the vocabulary fits, else
uint32), each a run of whole documents, every document followed by the end-of-document id, and `shards.json`, the
index: format, dtype, tokenizer, eos id, each file's token and document counts. Every file is written atomically and
the index last, so its presence marks a complete set. Parallel writers (one per pipeline task) name their files with a
prefix and write a partial index each; `merge_indexes` then writes the one `shards.json` that lists them all in order.
Readers memory-map the files and cut fixed windows of `seq_len + 1` tokens (inputs and shifted labels) within a shard;
no window crosses a file. Follows nanoGPT's `train.bin` and Megatron's indexed datasets, without their pickled indexes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pippin.errors import PippinError
from pippin.io import atomic_path, write_json_atomic

INDEX_FILE = "shards.json"
FORMAT = "pippin-token-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents and cuts a new file every `shard_tokens` tokens (at a document boundary). `close()` writes
    the index; a writer that never closes leaves no index, so the folder is not mistaken for a complete set. Files are
    named `<prefix>-00000.bin`, ...; the index is `index_name` (a partial one, for `merge_indexes`, when several
    writers share a folder)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        vocab_size: int,
        eos_id: int,
        shard_tokens: int = 1 << 24,
        meta: dict | None = None,
        prefix: str = "shard",
        index_name: str = INDEX_FILE,
    ):
        if not 0 <= eos_id < vocab_size:
            raise PippinError(f"eos id {eos_id} is outside the vocabulary (0..{vocab_size - 1})")
        self.folder = Path(folder)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.eos_id, self.shard_tokens = vocab_size, eos_id, shard_tokens
        self.meta = dict(meta or {})
        self.prefix, self.index_name = prefix, index_name
        self.shards: list[dict[str, Any]] = []
        self._buf: list[np.ndarray] = []
        self._n_buf = self._n_docs = 0

    def add(self, tokens: list[int] | np.ndarray) -> None:
        doc = np.asarray(tokens, dtype=np.int64)
        if doc.size and (doc.min() < 0 or doc.max() >= self.vocab_size):
            raise PippinError(f"a document has a token id outside 0..{self.vocab_size - 1}")
        self._buf.append(np.append(doc, self.eos_id).astype(self.dtype))
        self._n_buf += doc.size + 1
        self._n_docs += 1
        if self._n_buf >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        with atomic_path(self.folder / name) as tmp:
            np.concatenate(self._buf).tofile(tmp)
        self.shards.append({"file": name, "n_tokens": self._n_buf, "n_documents": self._n_docs})
        self._buf, self._n_buf, self._n_docs = [], 0, 0

    def close(self) -> Path:
        self._flush()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "n_documents": sum(s["n_documents"] for s in self.shards),
            "shards": self.shards,
            **self.meta,
        }
        write_json_atomic(self.folder / self.index_name, index)
        return self.folder / self.index_name


def merge_indexes(folder: str | Path, parts: list[str], meta: dict | None = None) -> Path:
    """Write `folder/shards.json` listing the shards of the partial indexes `parts` (file names in `folder`, written
    by ShardWriters with their own prefixes), in the order given. The parts must agree on format, dtype, vocabulary
    and eos id; their other keys come from the first part, updated by `meta`."""
    folder = Path(folder)
    indexes = []
    for name in parts:
        path = folder / name
        if not path.is_file():
            raise PippinError(f"partial shard index {path} is missing: a pipeline task did not finish; run the pipeline again to resume")
        indexes.append(json.loads(path.read_text()))
    if not indexes:
        raise PippinError(f"no partial shard indexes to merge in {folder}")
    keys = ("format", "version", "dtype", "vocab_size", "eos_id")
    for name, index in zip(parts, indexes):
        if any(index.get(k) != indexes[0].get(k) for k in keys):
            raise PippinError(f"{folder / name} disagrees with {folder / parts[0]} on {keys}: the parts come from different runs")
    merged = {k: v for k, v in indexes[0].items() if k not in ("shards", "n_tokens", "n_documents")}
    merged.update(meta or {})
    merged["shards"] = [s for index in indexes for s in index["shards"]]
    merged["n_tokens"] = sum(s["n_tokens"] for s in merged["shards"])
    merged["n_documents"] = sum(s["n_documents"] for s in merged["shards"])
    write_json_atomic(folder / INDEX_FILE, merged)
    return folder / INDEX_FILE


@dataclass(frozen=True)
class TokenShards:
    """A read-only view of a shard folder: `window(i, seq_len)` is the i-th run of seq_len + 1 tokens."""

    folder: Path
    index: dict[str, Any]
    arrays: tuple[np.memmap, ...]

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_tokens"])

    @property
    def eos_id(self) -> int:
        return int(self.index["eos_id"])

    def n_windows(self, seq_len: int) -> int:
        return sum(a.size // (seq_len + 1) for a in self.arrays)

    def window(self, i: int, seq_len: int) -> np.ndarray:
        """Tokens [i*(L+1), (i+1)*(L+1)) counted shard by shard, as int64 (seq_len + 1,)."""
        if i < 0:
            raise IndexError(i)
        for a in self.arrays:
            n = a.size // (seq_len + 1)
            if i < n:
                return np.asarray(a[i * (seq_len + 1) : (i + 1) * (seq_len + 1)], dtype=np.int64)
            i -= n
        raise IndexError("window index past the end of the shards")


def read_shards(folder: str | Path) -> TokenShards:
    """Open a shard folder, checking its index against the files (sizes, dtype) with an error that says what is wrong."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise PippinError(f"{folder} has no {INDEX_FILE}: not a finished shard set (`pippin data run` writes one)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PippinError(f"{path} is not JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise PippinError(f"{path} is not a {FORMAT} v{VERSION} index")
    if index.get("dtype") not in ("uint16", "uint32"):
        raise PippinError(f"{path}: dtype must be uint16 or uint32, not {index.get('dtype')!r}")
    dtype = np.dtype(index["dtype"])
    arrays = []
    for s in index.get("shards", []):
        f = folder / str(s["file"])
        if f.parent != folder or not f.is_file():
            raise PippinError(f"{path} names {s['file']!r}, which is not a file in {folder}")
        if f.stat().st_size != int(s["n_tokens"]) * dtype.itemsize:
            raise PippinError(f"{f} holds {f.stat().st_size} bytes, the index says {s['n_tokens']} {dtype.name} tokens")
        arrays.append(np.memmap(f, dtype=dtype, mode="r"))
    return TokenShards(folder=folder, index=index, arrays=tuple(arrays))
