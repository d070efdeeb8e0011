"""Atomic writes: the rename is the commit point, the folder is fsynced after it, and temporary files left by a
killed writer are cleaned up once stale (a fresh one may belong to a writer still at work)."""

import os
import time

import pytest

import pippin.io as io


def test_write_atomic_replaces_in_one_step_and_fsyncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = io.fsync_dir
    monkeypatch.setattr(io, "fsync_dir", lambda p: synced.append(os.fspath(p)) or real(p))
    io.write_json_atomic(tmp_path / "sub" / "x.json", {"a": 1})
    assert (tmp_path / "sub" / "x.json").read_text() == '{\n  "a": 1\n}\n'
    assert synced == [os.fspath(tmp_path / "sub")]
    assert oct((tmp_path / "sub" / "x.json").stat().st_mode & 0o777) == "0o644"

    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "sub" / "x.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "sub" / "x.json").read_text() == '{\n  "a": 1\n}\n'  # the old file, untouched
    assert not list((tmp_path / "sub").glob(".*.tmp"))


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".x.json.dead.tmp", tmp_path / ".x.json.busy.tmp"
    stale.write_text("left by a killed writer")
    fresh.write_text("another writer, still at work")
    old = time.time() - io.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    io.write_json_atomic(tmp_path / "x.json", [])
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_swaps_a_whole_folder_in(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without renameat2: the old folder is moved aside first
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    pkg = tmp_path / "m.mlpackage"
    with io.atomic_dir(pkg) as tmp:
        (tmp / "Data").mkdir()
        (tmp / "Data" / "w.bin").write_bytes(b"old")
        (tmp / "only-old.json").write_text("{}")
        assert not pkg.exists()  # nothing is visible before the block ends
    with io.atomic_dir(pkg) as tmp:
        (tmp / "Data").mkdir()
        (tmp / "Data" / "w.bin").write_bytes(b"new")
        assert (pkg / "Data" / "w.bin").read_bytes() == b"old"  # readers still see the old package
    assert sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*")) == ["Data", "Data/w.bin"]  # no mix
    assert (pkg / "Data" / "w.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]  # no temporary folder left

    with pytest.raises(RuntimeError), io.atomic_dir(pkg) as tmp:
        (tmp / "half").write_text("killed mid-write")
        raise RuntimeError
    assert (pkg / "Data" / "w.bin").read_bytes() == b"new" and not (pkg / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]


def test_stale_temporary_folders_are_removed(tmp_path):
    stale = tmp_path / ".m.mlpackage.dead.tmp"
    (stale / "Data").mkdir(parents=True)
    old = time.time() - io.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    with io.atomic_dir(tmp_path / "m.mlpackage") as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and (tmp_path / "m.mlpackage" / "x").read_text() == "1"
