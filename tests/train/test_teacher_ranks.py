"""The distillation teacher on ranks of its own, and meta-device model init, against in-process references (gloo, CPU).

1 student + 1 teacher rank must give the losses of 1 process with the teacher in process, and FSDP x2 + 1 teacher rank
those of FSDP x2 with in-process teachers (5 SGD steps, no clipping, <= 1e-6: the teacher's top-1 ids are the same
integers either way); context x2 + 1 teacher rank those of 1 process within CP's own 1e-5. A run with teacher ranks
killed after step 2 resumes with the same later losses. A model built on the meta device, sharded by FSDP x2 and then
materialized holds exactly the eager 1-process init of the same seed, and the run's first loss is the eager model's
loss on batch 0. Processes come from dist_scenarios.py ("teacher").
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # dist_scenarios is a script beside this file, not a package module

from dist_scenarios import save_teacher, tiny_config  # noqa: E402
from test_parallel import one_thread, write_shards  # noqa: E402, F401 - one_thread is an autouse fixture

TOL = 1e-6


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("teacher_ranks")
    write_shards(tmp / "shards")
    save_teacher(tmp)
    (tmp / "ports.json").write_text(json.dumps(free_ports(5)))
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(HERE / "dist_scenarios.py"), "teacher", "3", str(tmp)],
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp / "teacher.json").read_text())
    res["one_teacher"] = json.loads((tmp / "one_teacher.json").read_text())
    res["tmp"] = tmp
    return res


def test_one_student_and_a_teacher_rank_match_the_in_process_teacher(runs: dict) -> None:
    ref, got = np.array(runs["one_teacher"]), np.array(runs["s1t1"])
    assert len(got) == len(ref) == 5 and ref[-1] < ref[0] - 0.05  # it trains
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_fsdp2_students_and_a_teacher_rank_match_in_process_teachers(runs: dict) -> None:
    ref, got = np.array(runs["fsdp2_teacher"]), np.array(runs["s2t1"])
    assert len(got) == 5
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(ref, runs["one_teacher"], rtol=0, atol=1e-5)  # and FSDP x2 matches 1 process


def test_context_parallel_students_share_a_teacher_ranks_ids(runs: dict) -> None:
    """Context x2 + 1 teacher rank: the teacher sends the slice's ids to both context ranks, each keeps its chunks."""
    np.testing.assert_allclose(runs["cp2t1"], runs["one_teacher"], rtol=0, atol=1e-5)  # CP x2's own parity tolerance


def test_a_killed_run_with_a_teacher_rank_resumes_at_its_checkpoint(runs: dict) -> None:
    r = runs["s1t1_resume"]
    assert r["start"] == 2 and len(r["losses"]) == 3
    np.testing.assert_allclose(r["losses"], runs["s1t1"][2:], rtol=0, atol=TOL)


def test_meta_init_under_fsdp2_equals_the_eager_init(runs: dict) -> None:
    m = runs["meta_init"]
    assert m["meta_before"] and not m["meta_after"] and m["same_keys"]
    assert m["max_diff"] == 0.0  # bit for bit: every rank draws the same CPU stream and keeps its shard
    assert m["local_numel"] < 0.6 * m["total_numel"]  # and holds only about half of it


def test_first_loss_of_a_meta_init_fsdp2_run_is_the_eager_models_loss(runs: dict) -> None:
    """Step 1's loss (FSDP x2, meta init, teacher in process) against the eager 1-process model on global batch 0."""
    from pippin.data.shards import read_shards
    from pippin.model.checkpoint import load_model
    from pippin.model.config import get_preset
    from pippin.model.transformer import Transformer
    from pippin.train.losses import distill_loss
    from pippin.train.pretrain import init_weights
    from pippin.train.pretrain_log import GlobalBatches

    tmp = runs["tmp"]
    c = tiny_config(tmp / "x", tmp / "shards", {})
    cfg = dataclasses.replace(get_preset("tiny"), **({"head_dim": None} | c.model_overrides))  # as the trainer does
    model = init_weights(Transformer(cfg), seed=c.seed)
    teacher = load_model(tmp / "teacher").model
    batch = GlobalBatches(read_shards(tmp / "shards"), seq_len=c.seq_len, global_batch=c.global_batch, seed=c.seed,
                          dp_rank=0, dp_size=1).local(0)  # fmt: skip
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        expect = float(distill_loss(model(x), teacher(x).argmax(-1), y, teacher_weight=c.teacher_weight))
    assert abs(runs["fsdp2_teacher"][0] - expect) < TOL


def test_launches_that_do_not_fit_the_mesh_and_teacher_ranks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pippin.errors import PippinError
    from pippin.train.pretrain import run_pretrain

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PippinError, match="plus teacher_ranks 1 needs 3 processes, but 2"):
        run_pretrain(tiny_config(tmp_path / "a", tmp_path, {"fsdp": 2}, teacher="t", teacher_ranks=1))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PippinError, match="more than the data-parallel slices"):
        run_pretrain(tiny_config(tmp_path / "b", tmp_path, {"tensor": 2}, teacher="t", teacher_ranks=2))
