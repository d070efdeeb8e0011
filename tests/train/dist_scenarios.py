"""Multi-process scenarios for test_parallel.py: `python dist_scenarios.py NAME WORLD TMP` forks WORLD gloo ranks.

Each scenario runs the real trainer (`run_pretrain`) on several meshes inside one process group (group start-up is
the expensive part on CPU) and rank 0 writes what the tests compare to TMP/NAME.json. Forked before any torch
compute (fork after OpenMP threads exist is unsafe); the file store needs no free port.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tiny_config(out: Path, data: Path, mesh: dict, **kw) -> PretrainConfig:  # noqa: F821
    from pippin.train.pretrain import PretrainConfig

    base = {
        "out": str(out), "data": str(data), "model": "tiny", "model_overrides": {"qk_norm": True},
        "seq_len": 32, "global_batch": 8, "steps": 5, "seed": 0, "mesh": mesh, "checkpoint_every": 2,
        "keep_checkpoints": 5, "progress": False,
        "optim": {"name": "sgd", "lr": 0.5, "max_grad_norm": None, "warmup_steps": 0, "total_steps": 5},
    }  # fmt: skip
    base.update(kw)
    return PretrainConfig.from_dict(base)


def save_teacher(tmp: Path) -> Path:
    """A tiny pippin checkpoint with seed-7 weights (written once; every caller gets the same files)."""
    from pippin.model.checkpoint import LoadedModel, save_pippin
    from pippin.model.config import get_preset
    from pippin.model.transformer import Transformer

    path = tmp / "teacher"
    if not (path / "config.json").exists() and int(os.environ.get("RANK", "0")) == 0:
        torch.manual_seed(7)
        save_pippin(LoadedModel(model=Transformer(get_preset("tiny")), tokenizer=None, path=path, meta={}), path)
    if dist.is_initialized():
        dist.barrier()
    return path


def tied_grads(mesh_cfg: dict) -> dict[str, float]:
    """Max |grad - single-process grad| of the tied embedding and a QK-norm weight after one backward."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from pippin.model.config import get_preset
    from pippin.model.transformer import Transformer
    from pippin.train.parallelize import MeshConfig, build_mesh, parallelize, shard_context

    cfg = get_preset("tiny")
    cfg.qk_norm = True
    torch.manual_seed(1)
    ref = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).backward()
    mc = MeshConfig(**mesh_cfg)
    mesh = build_mesh(mc, "cpu")
    parallelize(model, mesh)
    rows = slice(mesh.dp_rank * 4 // mc.dp_size, (mesh.dp_rank + 1) * 4 // mc.dp_size)
    part = shard_context(x[rows], y[rows], mesh)
    with loss_parallel() if mc.tensor > 1 else torch.enable_grad():
        logits = model(part.tokens, positions=part.positions, cache=part.cache, mask=part.mask)
        F.cross_entropy(logits.flatten(0, 1), part.labels.flatten()).backward()
    out = {}
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_norm.weight", "layers.1.mlp.down_proj.weight"):
        g = model.get_parameter(name).grad
        g = g.full_tensor() if isinstance(g, DTensor) else g
        out[name] = float((g - ref.get_parameter(name).grad).abs().max())
    out["tied"] = model.lm_head.weight is model.embed_tokens.weight
    return out


def scenario_two(tmp: Path, rank: int) -> dict:
    from pippin.train.pretrain import run_pretrain

    data, res = tmp / "shards", {"losses": {}, "grads": {}}
    for name, mesh in {"fsdp2": {"fsdp": 2}, "tp2": {"tensor": 2}, "cp2": {"context": 2}}.items():
        res["losses"][name] = run_pretrain(tiny_config(tmp / name, data, mesh)).losses
        res["grads"][name] = tied_grads(mesh)
    # Resharding: the FSDP x2 run's step-2 checkpoint resumed on TP x2 for one step.
    if rank == 0:
        import shutil

        shutil.copytree(tmp / "fsdp2", tmp / "reshard_tp2")
        for step in (4, 5):
            shutil.rmtree(tmp / f"reshard_tp2/checkpoints/step-{step:07d}")
    dist.barrier()
    r = run_pretrain(tiny_config(tmp / "reshard_tp2", data, {"tensor": 2}, steps=3))
    res["reshard_tp2"] = {"start": r.start_step, "losses": r.losses}
    return res


def scenario_four(tmp: Path, rank: int) -> dict:
    from pippin.train.pretrain import run_pretrain

    data, res = tmp / "shards", {"losses": {}, "grads": {}}
    for name, mesh in {"dp2tp2": {"data": 2, "tensor": 2}, "fsdp2cp2": {"fsdp": 2, "context": 2}}.items():
        res["losses"][name] = run_pretrain(tiny_config(tmp / name, data, mesh)).losses
    res["grads"]["dp2tp2"] = tied_grads({"data": 2, "tensor": 2})
    # Distillation (the teacher runs whole on every rank) under TP x2 with loss parallel and CP x2's head-tail chunks.
    teacher = str(save_teacher(tmp))
    res["losses"]["tp2cp2_teacher"] = run_pretrain(
        tiny_config(tmp / "tp2cp2_teacher", data, {"tensor": 2, "context": 2}, teacher=teacher)
    ).losses
    return res


def _worker(rank: int, world: int, name: str, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    store = f"file://{tmp}/store-{name}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    res = {"two": scenario_two, "four": scenario_four}[name](Path(tmp), rank)
    if rank == 0:
        Path(tmp, f"{name}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    name, world, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mp.start_processes(_worker, args=(world, name, tmp), nprocs=world, start_method="fork", join=True)
