"""The pretraining loop in one process: kill -9 and resume, continue-pretraining a pippin checkpoint, distillation,
the JSONL metrics log and its plot, the config's JSON form. Multi-process parity is in test_parallel.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pippin.errors import PippinError
from pippin.model.checkpoint import LoadedModel, load_model, save_pippin
from pippin.model.config import get_preset
from pippin.model.transformer import Transformer
from pippin.train.losses import distill_loss
from pippin.train.optim import lr_at
from pippin.train.pretrain import PretrainConfig, run_pretrain
from pippin.train.pretrain_log import GlobalBatches, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_parallel import one_thread, write_shards  # noqa: E402, F401 - one_thread is an autouse fixture


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards") / "shards")


def config(out: Path, data: Path, **kw) -> PretrainConfig:
    base = {"out": str(out), "data": str(data), "model": "tiny", "seq_len": 32, "global_batch": 4, "steps": 4,
            "checkpoint_every": 2, "async_checkpoint": False, "progress": False,
            "optim": {"name": "adamw", "lr": 3e-3, "warmup_steps": 2, "total_steps": 60, "max_grad_norm": 1.0}}  # fmt: skip
    return PretrainConfig.from_dict(base | kw)


def test_config_json_round_trip_and_bad_keys(tmp_path: Path) -> None:
    c = config(tmp_path / "r", tmp_path / "d", mesh={"fsdp": 2, "tensor": 2}, bf16=True)
    back = PretrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.mesh.world_size == 4 and back.optim.betas == (0.9, 0.95)
    with pytest.raises(PippinError, match="unknown keys"):
        PretrainConfig.from_dict(c.to_dict() | {"lr": 1.0})
    with pytest.raises(PippinError, match="needs 4 processes"):
        c.mesh.check(get_preset("tiny"), seq_len=32, global_batch=4, world_size=1)


def test_kill9_resumes_with_at_most_one_interval_lost(tmp_path: Path, shards: Path) -> None:
    """A run killed with SIGKILL mid-training resumes from its last complete checkpoint; its losses then equal an
    uninterrupted run's exactly (AdamW state and the data position come back), and the log has every step once."""
    steps, every = 60, 5
    cfg = config(tmp_path / "killed", shards, steps=steps, checkpoint_every=every, async_checkpoint=True)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PIPPIN_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pippin.train.pretrain", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / f"killed/checkpoints/step-{2 * every:07d}/complete.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    logged = read_metrics(tmp_path / "killed")[-1]["step"]
    assert logged < steps
    resumed = run_pretrain(cfg)
    # Async saves: at most one interval plus the steps the newest save was still being written (under one interval,
    # as a save waits for the previous one); in practice one interval + 1.
    assert resumed.start_step >= 2 * every and logged - resumed.start_step < 2 * every
    reference = run_pretrain(config(tmp_path / "whole", shards, steps=steps, checkpoint_every=every))
    assert resumed.losses == reference.losses[resumed.start_step :]
    rows = read_metrics(tmp_path / "killed")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["lr"] for r in rows] == [lr_at(s, cfg.optim) for s in range(steps)]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "killed/metrics.png").stat().st_size > 1000
    with pytest.raises(PippinError, match="another model, data or seed"):
        run_pretrain(config(tmp_path / "killed", shards, steps=steps + 1, seed=1))


def test_continue_pretraining_from_a_pippin_model_with_a_teacher(tmp_path: Path, shards: Path) -> None:
    """init_from loads real weights (step 1's loss is the loaded model's loss on batch 0); the distillation loss is
    AFM's target on the teacher's logits; the output is a pippin checkpoint that load_model reads."""
    cfg = get_preset("tiny")
    torch.manual_seed(5)
    student, teacher = Transformer(cfg), Transformer(cfg)
    for name, m in (("student", student), ("teacher", teacher)):
        save_pippin(LoadedModel(model=m, tokenizer=None, path=tmp_path / name, meta={}), tmp_path / name)
    c = config(tmp_path / "run", shards, init_from=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"), steps=2)
    res = run_pretrain(c)
    batch = GlobalBatches(load_shards(shards), seq_len=32, global_batch=4, seed=0, dp_rank=0, dp_size=1).local(0)
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        expect = distill_loss(student(x), teacher(x).argmax(-1), y, teacher_weight=0.9)
        plain = F.cross_entropy(student(x).flatten(0, 1), y.flatten())
    assert abs(res.losses[0] - float(expect)) < 1e-5 and abs(float(expect) - float(plain)) > 1e-3
    out = load_model(res.model_path)
    assert out.model.config == cfg and out.meta["init_from"] == str(tmp_path / "student")
    moved = (out.model.embed_tokens.weight - student.embed_tokens.weight).abs().max()
    assert 0 < moved < 0.1  # trained from the loaded weights, not from a fresh init


def load_shards(folder: Path):  # noqa: ANN201 - the reader's own type
    from pippin.data.shards import read_shards

    return read_shards(folder)


def test_activation_checkpointing_and_bf16_match_plain_training(tmp_path: Path, shards: Path) -> None:
    """Recomputing blocks changes no number (and no checkpoint name); bf16 autocast stays close to fp32."""
    plain = run_pretrain(config(tmp_path / "plain", shards, steps=3))
    ac = run_pretrain(config(tmp_path / "ac", shards, steps=3, activation_checkpointing=True))
    assert max(abs(a - b) for a, b in zip(ac.losses, plain.losses)) < 1e-6
    from safetensors.torch import load_file

    assert load_file(ac.model_path / "model.safetensors").keys() == load_file(plain.model_path / "model.safetensors").keys()
    bf16 = run_pretrain(config(tmp_path / "bf16", shards, steps=3, bf16=True))
    assert max(abs(a - b) for a, b in zip(bf16.losses, plain.losses)) < 0.05


def test_command_prints_the_torchrun_line_for_a_mesh(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture) -> None:
    from pippin.cli import main

    path = tmp_path / "c.json"
    path.write_text(json.dumps(config(tmp_path / "run", shards, mesh={"fsdp": 2, "tensor": 2}).to_dict()))
    assert main(["pretrain", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"torchrun --nproc-per-node 4 -m pippin.train.pretrain --config {path}"
    teacher = config(tmp_path / "run", shards, mesh={"fsdp": 2}, teacher="default", teacher_ranks=1)
    path.write_text(json.dumps(teacher.to_dict()))
    assert main(["pretrain", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"torchrun --nproc-per-node 3 -m pippin.train.pretrain --config {path}"
    with pytest.raises(PippinError, match="needs a teacher"):
        config(tmp_path / "run", shards, teacher_ranks=1)
    path.write_text(json.dumps({"out": "x", "data": "y", "mesh": {"pipeline": 2}}))
    assert main(["pretrain", "--config", str(path)]) == 2


@pytest.mark.real
def test_continue_pretraining_the_default_model(tmp_path: Path) -> None:
    """The real default model continues pretraining on text shards: step 1's loss is the loaded model's own loss on
    that batch (a real language model's, far below ln V), and the result generates with the saved tokenizer."""
    from pippin.data.shards import ShardWriter, read_shards

    base = load_model("default")
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    w = ShardWriter(tmp_path / "shards", vocab_size=base.model.config.vocab_size, eos_id=base.model.config.eos_token_ids[0])
    for para in text.split("\n\n"):
        w.add(base.tokenizer.encode(para))
    w.close()
    c = config(tmp_path / "run", tmp_path / "shards", init_from="default", seq_len=64, global_batch=2, steps=2,
               optim={"name": "sgd", "lr": 1e-3, "max_grad_norm": None, "total_steps": 2})  # fmt: skip
    res = run_pretrain(c)
    batch = GlobalBatches(read_shards(tmp_path / "shards"), seq_len=64, global_batch=2, seed=0, dp_rank=0, dp_size=1).local(0)
    with torch.no_grad():
        expect = F.cross_entropy(base.model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    assert abs(res.losses[0] - float(expect)) < 1e-4 and res.losses[0] < 6.0
    out = load_model(res.model_path)
    assert out.tokenizer is not None and out.model.config == base.model.config
    ids = out.tokenizer.encode("The capital of France is")
    assert out.model(torch.tensor([ids])).shape == (1, len(ids), out.model.config.vocab_size)


def test_adastar_runs_the_loop_and_an_anomalous_gradient_norm_skips_the_step(tmp_path: Path, shards: Path) -> None:
    """AFM's optimizer trains in the loop; with drop_grad_norm below every norm each step is skipped (AXLearn's
    skip_and_clip): 2 skipped steps leave the same weights as 1 (both the seeded initial ones), and the log says so."""
    adastar = {"name": "adastar", "lr": 1e-2, "warmup_steps": 1, "total_steps": 8, "max_grad_norm": 1.0}
    trained = run_pretrain(config(tmp_path / "a", shards, steps=6, optim=adastar))
    assert trained.losses[-1] < trained.losses[0]
    assert not any(r["skipped"] for r in read_metrics(tmp_path / "a"))
    frozen = run_pretrain(config(tmp_path / "s", shards, steps=2, optim=adastar | {"drop_grad_norm": 1e-9}))
    assert all(r["skipped"] for r in read_metrics(tmp_path / "s"))
    start = run_pretrain(config(tmp_path / "z", shards, steps=1, optim=adastar | {"drop_grad_norm": 1e-9}))
    weights = [load_model(p).model.state_dict() for p in (frozen.model_path, start.model_path)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
