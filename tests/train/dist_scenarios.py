"""Multi-process scenarios for test_parallel.py and test_teacher_ranks.py: `python dist_scenarios.py NAME WORLD TMP`
forks WORLD gloo ranks.

Each scenario runs the real trainer (`run_pretrain`) on several meshes inside one process group (group start-up is
the expensive part on CPU) and rank 0 writes what the tests compare to TMP/NAME.json. Forked before any torch
compute (fork after OpenMP threads exist is unsafe); the file store needs no free port. The "teacher" scenario
instead lets run_pretrain join torchrun-style env:// rendezvous itself (teacher ranks need that), on free TCP ports.
"""

from __future__ import annotations

import dataclasses
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


def scenario_teacher(tmp: Path, rank: int, ports: list[int]) -> dict | None:
    """Three forked processes, three launches as torchrun would make them (RANK, WORLD_SIZE, MASTER_PORT):
    1 student + 1 teacher rank (rank 2 meanwhile runs the 1-process in-process reference), the same resumed from its
    step-2 checkpoint, FSDP x2 + 1 teacher rank, context x2 + 1 teacher rank, then FSDP x2 with in-process teachers
    and the meta-init check."""
    import shutil

    from pippin.train.pretrain import run_pretrain

    data, teacher, res = tmp / "shards", str(tmp / "teacher"), {}

    def launch(world_size: int, port: int) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # fmt: skip

    if rank < 2:
        launch(2, ports[0])
        cfg = tiny_config(tmp / "s1t1", data, {}, teacher=teacher, teacher_ranks=1, async_checkpoint=False)
        res["s1t1"] = run_pretrain(cfg).losses
        if rank == 0:  # a killed run: only its step-2 checkpoint survives
            shutil.copytree(tmp / "s1t1", tmp / "s1t1_resume")
            for step in (4, 5):
                shutil.rmtree(tmp / f"s1t1_resume/checkpoints/step-{step:07d}")
        launch(2, ports[1])
        r = run_pretrain(dataclasses.replace(cfg, out=str(tmp / "s1t1_resume")))
        res["s1t1_resume"] = {"start": r.start_step, "losses": r.losses}
    else:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        res["one_teacher"] = run_pretrain(tiny_config(tmp / "one_teacher", data, {}, teacher=teacher)).losses
        Path(tmp, "one_teacher.json").write_text(json.dumps(res["one_teacher"]))
    launch(3, ports[2])
    res["s2t1"] = run_pretrain(tiny_config(tmp / "s2t1", data, {"fsdp": 2}, teacher=teacher, teacher_ranks=1)).losses
    launch(3, ports[3])  # both context ranks of the one slice get its ids and keep their own chunks
    res["cp2t1"] = run_pretrain(tiny_config(tmp / "cp2t1", data, {"context": 2}, teacher=teacher, teacher_ranks=1)).losses
    if rank == 2:
        return None
    launch(2, ports[4])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    res["fsdp2_teacher"] = run_pretrain(tiny_config(tmp / "fsdp2_teacher", data, {"fsdp": 2}, teacher=teacher)).losses
    res["meta_init"] = meta_init_check({"fsdp": 2})
    dist.destroy_process_group()
    return res if rank == 0 else None


def meta_init_check(mesh_cfg: dict) -> dict:
    """Build the tiny model on the meta device, parallelize, materialize; compare with the eager 1-process init."""
    from pippin.model.config import get_preset
    from pippin.model.transformer import Transformer
    from pippin.train.dist_checkpoint import full_state
    from pippin.train.parallelize import MeshConfig, build_mesh, parallelize
    from pippin.train.pretrain import init_weights, materialize_

    cfg = get_preset("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    meta_before = all(p.is_meta for p in model.parameters())
    parallelize(model, build_mesh(MeshConfig(**mesh_cfg), "cpu"))
    materialize_(model, torch.device("cpu"), seed=3)
    local = [p.to_local() for p in model.parameters()]
    state = full_state(model)
    out = {"meta_before": meta_before, "meta_after": any(t.is_meta for t in [*local, *model.buffers()]),
           "local_numel": sum(t.numel() for t in local), "total_numel": sum(p.numel() for p in model.parameters())}  # fmt: skip
    if dist.get_rank() == 0:
        eager = init_weights(Transformer(cfg), seed=3).state_dict()
        out["max_diff"] = max(float((state[k] - eager[k]).abs().max()) for k in state)
        out["same_keys"] = sorted(state) == sorted(eager)
    return out


def _worker(rank: int, world: int, name: str, tmp: str) -> None:
    torch.set_num_threads(1)
    if name == "teacher":
        ports = json.loads(Path(tmp, "ports.json").read_text())
        res = scenario_teacher(Path(tmp), rank, ports)
        if res is not None:
            Path(tmp, f"{name}.json").write_text(json.dumps(res))
        return
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
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
