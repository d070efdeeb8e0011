"""Atomic file writes: write to a temporary name in the same folder, fsync, rename, then fsync the folder.

A reader (or a crash, or a power cut) never sees a half-written checkpoint, config or cache file: the rename is the
commit point, and the folder's fsync makes it durable. Temporary files have unique names (two writers of one file
do not clobber each other), and ones left by a killed writer are removed once they are an hour old.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STALE_TEMP_S = 3600
"""A temporary file untouched this long belongs to a writer that died (no write of pippin's takes an hour)."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames, creations and removals in a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str | os.PathLike) -> None:
    """Remove a file if it exists, durably (the folder is fsynced): a commit marker taken back before a rewrite."""
    path = Path(path)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name next to `path` to write to; when the block ends it is fsynced and renamed onto `path` (and
    the folder fsynced), or removed if the block raised. Creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint or config should read like any other file
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step; creates parent folders."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) for each non-blank line of a JSONL file; a line that is not JSON is a PippinError naming
    it (the caller checks each row's shape)."""
    from pippin.errors import PippinError

    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PippinError(f"{path}:{n}: not UTF-8 text (byte {e.start}); save the file as UTF-8.") from None
        except json.JSONDecodeError as e:
            raise PippinError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
        yield n, row
