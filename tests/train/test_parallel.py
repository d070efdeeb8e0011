"""Parallel pretraining on CPU/gloo against one process: loss parity, tied gradients, resharded resume.

The same tiny model (tied embeddings, GQA 4:2, QK-norm) and global batch run 5 SGD steps without clipping (so a
SUM-vs-AVG reduction bug cannot hide behind Adam's or clipping's scale invariance) on 1 process, FSDP x2, TP x2
(SP + loss parallel), context parallel x2, DP x2 x TP x2 and FSDP x2 x CP x2; the losses must agree within 1e-5.
A checkpoint saved on FSDP x2 resumes on TP x2 and on one process with the same next-step loss. Multi-process
groups are forked by dist_scenarios.py (one group per world size: starting gloo groups is the slow part).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pippin.data.shards import ShardWriter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # dist_scenarios is a script beside this file, not a package module

from dist_scenarios import save_teacher, tiny_config  # noqa: E402

TOL = 1e-5


def write_shards(folder: Path) -> Path:
    w = ShardWriter(folder, vocab_size=256, eos_id=0, shard_tokens=2000)
    rng = np.random.default_rng(0)
    for _ in range(60):  # counting runs (next token = this + 1 mod 255) with random starts: learnable in a few steps
        start, n = rng.integers(1, 256), int(rng.integers(20, 120))
        w.add((start + np.arange(n)) % 255 + 1)
    w.close()
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each rank has: tiny matmuls on a shared 2-core machine are slower with two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run both multi-process scenarios and the 1-process reference once for every test here."""
    tmp = tmp_path_factory.mktemp("parallel")
    write_shards(tmp / "shards")
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    out = {}
    for name, world in (("two", 2), ("four", 4)):
        proc = subprocess.run([sys.executable, str(HERE / "dist_scenarios.py"), name, str(world), str(tmp)],
                              env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = json.loads((tmp / f"{name}.json").read_text())
    from pippin.train.pretrain import run_pretrain

    out["one"] = run_pretrain(tiny_config(tmp / "one", tmp / "shards", {})).losses
    teacher = str(save_teacher(tmp))
    out["one_teacher"] = run_pretrain(tiny_config(tmp / "one_teacher", tmp / "shards", {}, teacher=teacher)).losses
    shutil.copytree(tmp / "fsdp2", tmp / "reshard_one")
    for step in (4, 5):
        shutil.rmtree(tmp / f"reshard_one/checkpoints/step-{step:07d}")
    r = run_pretrain(tiny_config(tmp / "reshard_one", tmp / "shards", {}, steps=3))
    out["reshard_one"] = {"start": r.start_step, "losses": r.losses}
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("mesh", ["fsdp2", "tp2", "cp2", "dp2tp2", "fsdp2cp2"])
def test_loss_parity(runs: dict, mesh: str) -> None:
    ref = np.array(runs["one"])
    got = np.array({**runs["two"]["losses"], **runs["four"]["losses"]}[mesh])
    assert len(got) == len(ref) == 5
    assert ref[-1] < ref[0] - 0.05  # the run trains; parity is not of a flat line
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_distillation_parity_under_tensor_and_context_parallel(runs: dict) -> None:
    ref, got = np.array(runs["one_teacher"]), np.array(runs["four"]["losses"]["tp2cp2_teacher"])
    assert np.abs(ref - np.array(runs["one"])).max() > 1e-3  # the teacher changes the target
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("mesh", ["fsdp2", "tp2", "cp2", "dp2tp2"])
def test_tied_and_shared_gradients_match_one_process(runs: dict, mesh: str) -> None:
    grads = {**runs["two"]["grads"], **runs["four"]["grads"]}[mesh]
    assert grads.pop("tied") is True  # the head still reads the embedding's (sharded) weight
    for name, diff in grads.items():
        assert diff < 1e-6, (name, diff)


def test_final_weights_match_one_process(runs: dict) -> None:
    from safetensors.torch import load_file

    ref = load_file(runs["tmp"] / "one/model/model.safetensors")
    assert "lm_head.weight" not in ref
    for mesh in ("fsdp2", "tp2", "cp2", "dp2tp2"):
        got = load_file(runs["tmp"] / mesh / "model/model.safetensors")
        assert got.keys() == ref.keys()
        worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        assert worst < 1e-5, (mesh, worst)


@pytest.mark.parametrize("target", ["reshard_tp2", "reshard_one"])
def test_fsdp_checkpoint_resumes_on_another_mesh(runs: dict, target: str) -> None:
    res = runs["two"][target] if target in runs["two"] else runs[target]
    assert res["start"] == 2 and len(res["losses"]) == 1
    assert abs(res["losses"][0] - runs["two"]["losses"]["fsdp2"][2]) < TOL
    assert abs(res["losses"][0] - runs["one"][2]) < TOL
