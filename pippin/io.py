"""Atomic file writes: write to a temporary name in the same folder, fsync, rename, then fsync the folder.

A reader (or a crash, or a power cut) never sees a half-written checkpoint, config or cache file: the rename is the
commit point, and the folder's fsync makes it durable. Temporary files have unique names (two writers of one file
do not clobber each other), and ones left by a killed writer are removed once they are an hour old. A folder (a
Core ML package) is written the same way and swapped in whole (`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
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
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to `path` to fill; when the block ends its files are fsynced and it takes `path`'s
    place in one rename (an existing folder is swapped out in one step where the system can, then removed), or it
    is removed if the block raised. A reader sees the old folder or the new one, never a mix or neither."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}, key=lambda d: -len(d.parts)):
            fsync_dir(d)
        if path.exists() and _exchange(tmp, path):
            fsync_dir(path.parent)
            shutil.rmtree(tmp)  # now the old folder
            return
        if path.exists():  # no exchange here: move the old one aside first (a short window without `path`)
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old)
            return
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
