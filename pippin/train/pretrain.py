"""Pretraining on PyTorch's own distributed stack: one config, one loop, from 1 process to a GPU cluster.

  torchrun --nproc-per-node 4 -m pippin.train.pretrain --config run.json     # gloo on CPU, nccl on CUDA
  pippin pretrain --config run.json                                           # a single process

`PretrainConfig` (JSON in and out) names the mesh, the model (a preset or a pippin checkpoint to continue from), the
token shards, optimizer and schedule, precision, activation checkpointing, checkpoint interval and an optional
teacher for AFM's distillation, in each process or on ranks of its own (`teacher_ranks.py`). A model trained from
scratch is built on the meta device, parallelized from outside (`parallelize.py`), then materialized shard by shard
with an init that equals the eager one bit for bit. Checkpoints are sharded DCP folders that reshard on resume
(`dist_checkpoint.py`); a killed run resumes from its last complete checkpoint. The run ends with OUT/model, a
pippin checkpoint like any other. Follows torchtitan's train.py; the schedule and the distillation target are AFM's
(shared/reference/afm.md 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from pippin.data.shards import read_shards
from pippin.errors import PippinError
from pippin.io import write_json_atomic
from pippin.model.checkpoint import LoadedModel, load_model, save_pippin
from pippin.model.config import get_preset
from pippin.model.transformer import Transformer, rope_tables
from pippin.train.dist_checkpoint import Checkpointer, full_state, latest_complete, load_checkpoint
from pippin.train.losses import distill_loss
from pippin.train.optim import OptimConfig, build_optimizer, clip_grads_, lr_at, set_lr
from pippin.train.parallelize import MeshConfig, build_mesh, parallelize, shard_context, training_flops_per_token, world_mean
from pippin.train.pretrain_log import GlobalBatches, MetricsLog, plot_metrics
from pippin.train.teacher_ranks import TeacherLink, connect, serve_teacher, teacher_top1

# Dense bf16 peak per GPU (vendor datasheets), for MFU; other devices need PretrainConfig.peak_tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
# What a run's identity is made of: resuming with another value of these is refused (mesh, steps and logging may change).
IDENTITY = ("model", "model_overrides", "init_from", "data", "seq_len", "global_batch", "seed", "teacher")


@dataclass(kw_only=True)
class PretrainConfig:
    out: str
    """Run folder: pretrain_config.json, metrics.jsonl/.png, checkpoints/, and the final model in model/."""
    data: str
    """Token shard folder (pippin.data.shards)."""
    model: str = "tiny"
    """A model preset (pippin.model.config.PRESETS) to train from scratch; ignored when init_from is set."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields replacing the preset's (e.g. {"n_layers": 4})."""
    init_from: str | None = None
    """Continue pretraining this model: a pippin/HF folder, a .gguf, or "default"."""
    tokenizer: str | None = None
    """A model folder (or "default") whose tokenizer is saved with OUT/model; init_from brings its own."""
    seq_len: int = 256
    global_batch: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    steps: int = 100
    seed: int = 0
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: str = "auto"
    """cpu, cuda or auto (cuda when present)."""
    bf16: bool | None = None
    """bf16 compute with fp32 weights, gradients and optimizer state; None: on where the device supports it."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    compile: bool = False
    """torch.compile each block (torchtitan's per-block compile); for GPUs: minutes of compile time on a CPU."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a kill loses at most this many); the last step is always saved."""
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    """Write checkpoints in the background (DCP async_save); committed once every rank has finished."""
    teacher: str | None = None
    """Distill from this pippin model: target 0.9 onehot(teacher top-1) + 0.1 onehot(label) (AFM)."""
    teacher_weight: float = 0.9
    teacher_ranks: int = 0
    """Ranks that run only the teacher and send its top-1 ids (launch mesh + this many processes); 0: in each process."""
    peak_tflops: float | None = None
    """Per-rank peak for MFU; None: a known GPU's bf16 peak, else MFU is not reported."""
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.global_batch < 1 or self.steps < 1 or self.checkpoint_every < 1:
            raise PippinError("pretrain: seq_len, global_batch, steps and checkpoint_every must be >= 1")
        if self.teacher_ranks < 0 or (self.teacher_ranks and not self.teacher):
            raise PippinError(f"pretrain: teacher_ranks {self.teacher_ranks} needs a teacher model and must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise PippinError(f"pretrain config: unknown keys {sorted(set(data) - known)}; known keys: {sorted(known)}")
        data = dict(data)
        try:
            data["mesh"] = MeshConfig(**data.get("mesh", {}))
            data["optim"] = OptimConfig(**data.get("optim", {}))
            return cls(**data)
        except TypeError as e:
            raise PippinError(f"pretrain config: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PretrainConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PippinError(f"cannot read the pretrain config {path}: {e}") from None

    def identity_hash(self) -> str:
        ident = {k: getattr(self, k) for k in IDENTITY} | {"optimizer": self.optim.name}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(kw_only=True)
class PretrainResult:
    losses: list[float]
    """The global-batch loss of each step this call ran."""
    start_step: int
    steps: int
    model_path: Path
    tokens_per_s: float


def _init_distributed(config: PretrainConfig, device: str) -> tuple[bool, TeacherLink | None]:
    """Join the process groups torchrun describes: (True if this call created the default group and must destroy it,
    the link to the teacher ranks if there are any)."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=300)
    if config.teacher_ranks:
        link = connect(mesh=config.mesh, n_teachers=config.teacher_ranks, backend="nccl" if device == "cuda" else "gloo",
                       timeout=timeout)  # fmt: skip
        return dist.is_initialized(), link
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False, None
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    return True, None


def _build(config: PretrainConfig, device: torch.device) -> tuple[Transformer, Any]:
    """The model to train and its tokenizer. From scratch it is built on the meta device (no memory) and materialized
    by `materialize_` after parallelize, so a model larger than one rank's memory can be built sharded."""
    if config.init_from:
        loaded = load_model(config.init_from)
        model, tokenizer = loaded.model.float().to(device), loaded.tokenizer
    else:
        # head_dim follows dim / n_heads unless given (the preset's own head_dim is derived, not a choice).
        cfg = dataclasses.replace(get_preset(config.model), **({"head_dim": None} | config.model_overrides))
        with torch.device("meta"):
            model, tokenizer = Transformer(cfg), None
    if config.tokenizer:
        from pippin.model.checkpoint import prepare_default
        from pippin.model.tokenizer import Tokenizer

        folder = prepare_default() if config.tokenizer == "default" else Path(config.tokenizer)
        tokenizer = Tokenizer.load(folder)
    return model.train(), tokenizer


def materialize_(model: Transformer, device: torch.device, *, seed: int) -> Transformer:
    """Allocate a meta-device model (whole or already sharded by parallelize) on device and initialise it with
    `init_weights`: each rank allocates only its shards."""
    model.to_empty(device=device)
    cfg = model.config
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return init_weights(model, seed=seed)


@torch.no_grad()
def init_weights(model: Transformer, *, seed: int, std: float = 0.02) -> Transformer:
    """GPT-2's initialisation for training from scratch: N(0, 0.02) matrices and embedding (the tied head's logits
    start near zero, loss near ln V), output projections scaled by 1/sqrt(2 L), unit norm gains.

    Every rank draws each parameter's full tensor, in name order, on the CPU from a generator seeded with `seed`, and
    keeps its own shard (a DTensor's placements): the same weights, bit for bit, on any mesh and device, sharded or
    not. The cost is one full parameter at a time in memory and every rank drawing all N numbers (seconds)."""
    gen = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        full = torch.empty(p.shape)  # a DTensor's shape is the global one
        if p.ndim == 1:
            full.fill_(1.0)
        else:
            full.normal_(0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std, generator=gen)
        full = full.to(p.device, p.dtype)
        if isinstance(p, DTensor):  # slice this rank's shard locally: no communication
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(full)
    return model


def _peak_flops(config: PretrainConfig, device: torch.device) -> float | None:
    if config.peak_tflops:
        return config.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Train (or resume) the run in config.out. Call it on every rank; a process group is joined if torchrun made one."""
    device_type = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    created, link = _init_distributed(config, device_type)
    try:
        if link is not None and link.is_teacher:
            device = _device(device_type)
            served = serve_teacher(link, config, device, _teacher_autocast(config, device_type))
            return PretrainResult(losses=[], start_step=config.steps - served, steps=config.steps,
                                  model_path=Path(config.out) / "model", tokens_per_s=0.0)  # fmt: skip
        return _train(config, device_type, link)
    finally:
        if created:
            dist.destroy_process_group()


def _device(device_type: str) -> torch.device:
    return torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def _bf16(config: PretrainConfig, device_type: str) -> bool:
    return config.bf16 if config.bf16 is not None else (device_type == "cuda" and torch.cuda.is_bf16_supported())


def _teacher_autocast(config: PretrainConfig, device_type: str) -> Any:
    """The teacher is never sharded: bf16 compute by autocast where the run uses bf16."""
    return torch.autocast(device_type, torch.bfloat16) if _bf16(config, device_type) else contextlib.nullcontext()


def _train(config: PretrainConfig, device_type: str, link: TeacherLink | None) -> PretrainResult:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device, bf16 = _device(device_type), _bf16(config, device_type)
    out = Path(config.out)
    model, tokenizer = _build(config, device)
    mcfg = model.config
    config.mesh.check(mcfg, seq_len=config.seq_len, global_batch=config.global_batch, world_size=world)
    mesh = build_mesh(config.mesh, device_type)
    sharded = mesh.world is not None and config.mesh.data * config.mesh.fsdp * config.mesh.context > 1
    parallelize(
        model,
        mesh,
        activation_checkpointing=config.activation_checkpointing,
        compile_blocks=config.compile,
        param_dtype=torch.bfloat16 if bf16 and sharded else None,
    )
    if model.embed_tokens.weight.is_meta:
        materialize_(model, device, seed=config.seed)
    optimizer = build_optimizer(model.named_parameters(), config.optim)
    in_process = config.teacher and link is None
    teacher = load_model(config.teacher).model.to(device).eval().requires_grad_(False) if in_process else None

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "pretrain_config.json", config.to_dict())
    start = 0
    found = latest_complete(out / "checkpoints")
    if found is not None:
        folder, marker = found
        if marker.get("config_hash") != config.identity_hash():
            raise PippinError(f"{out} holds a run with another model, data or seed ({folder}); use a new --out")
        load_checkpoint(folder, model, optimizer)
        start = marker["step"]
    if link is not None:
        link.start_step(start)  # the teacher ranks follow the students' step counter
    shards = read_shards(config.data)
    if int(shards.index.get("vocab_size", 0)) > mcfg.vocab_size:
        raise PippinError(f"{config.data} has ids up to {shards.index['vocab_size'] - 1}, past the vocabulary ({mcfg.vocab_size})")
    loader = GlobalBatches(
        shards, seq_len=config.seq_len, global_batch=config.global_batch, seed=config.seed,
        dp_rank=mesh.dp_rank, dp_size=config.mesh.dp_size,
    )  # fmt: skip
    log = MetricsLog(out, resume_step=start, enabled=rank == 0)
    ckpt = Checkpointer(out / "checkpoints", use_async=config.async_checkpoint, keep=config.keep_checkpoints)
    flops_token, peak = training_flops_per_token(mcfg, config.seq_len), _peak_flops(config, device)
    tp_loss = config.mesh.tensor > 1 and config.mesh.loss_parallel
    # bf16 compute: FSDP's MixedPrecisionPolicy when sharded, else autocast.
    autocast = torch.autocast(device_type, torch.bfloat16) if bf16 and not sharded else contextlib.nullcontext()
    teacher_autocast = _teacher_autocast(config, device_type)
    losses, t_run, tok_s = [], time.perf_counter(), 0.0
    bar = None
    if config.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"pretrain {config.mesh.describe()}", unit="step")
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, config.optim)
        set_lr(optimizer, lr)
        batch = loader.local(step).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        part = shard_context(x, y, mesh)
        with autocast:
            logits = model(part.tokens, positions=part.positions, cache=part.cache, mask=part.mask)
        t_ids = None  # the teacher's top-1 ids of this rank's full rows (B_local, T)
        if teacher is not None:
            t_ids = teacher_top1(teacher, x, teacher_autocast)  # the teacher is whole on every rank
        elif link is not None:
            t_ids = link.recv_top1(mesh.dp_rank, tuple(x.shape), device)  # from the teacher rank serving this slice
        if t_ids is not None and part.positions is not None:
            t_ids = t_ids[:, part.positions[0]]  # this rank's context chunks
        with loss_parallel() if tp_loss else contextlib.nullcontext():  # vocab-sharded logits under TP
            if t_ids is not None:
                loss = distill_loss(logits, t_ids, part.labels, teacher_weight=config.teacher_weight)
            else:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), part.labels.flatten())
            loss.backward()
        clipped = clip_grads_(model.parameters(), config.optim)  # AFM: clip at max_grad_norm, skip at drop_grad_norm
        grad_norm = clipped.norm
        if not clipped.skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = world_mean(loss.full_tensor() if isinstance(loss, DTensor) else loss)
        losses.append(loss_value)
        done = step + 1
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0  # the step's compute; checkpoint writes are not in it
        if done % config.checkpoint_every == 0 or done == config.steps:
            ckpt.save(model, optimizer, {"step": done, "config_hash": config.identity_hash(), "mesh": dataclasses.asdict(config.mesh),
                                         "samples_seen": done * config.global_batch, "seed": config.seed})  # fmt: skip
        else:
            ckpt.poll()
        tok_s = config.global_batch * config.seq_len / dt
        if done % config.log_every == 0 or done == config.steps:
            row = {"step": done, "loss": loss_value, "grad_norm": grad_norm, "skipped": clipped.skip, "lr": lr, "tokens_per_s": tok_s,
                   "tokens_per_s_per_rank": tok_s / world, "step_s": dt, "mesh": config.mesh.describe()}  # fmt: skip
            if peak:
                row["mfu"] = flops_token * tok_s / world / peak
            log.write(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:.0f}")
    if bar is not None:
        bar.close()
    ckpt.wait()
    model_path = _export(model, tokenizer, out, config, rank)
    if rank == 0 and losses:
        plot_metrics(out)
    return PretrainResult(losses=losses, start_step=start, steps=config.steps, model_path=model_path,
                          tokens_per_s=config.global_batch * config.seq_len * len(losses) / (time.perf_counter() - t_run))  # fmt: skip


def _export(model: torch.nn.Module, tokenizer: Any, out: Path, config: PretrainConfig, rank: int) -> Path:
    """Gather the full fp32 weights to rank 0 and save them as a pippin checkpoint (OUT/model)."""
    state = full_state(model)
    path = out / "model"
    if rank == 0:
        with torch.device("meta"):
            plain = Transformer(model.config)
        plain.load_state_dict(state, assign=True)
        plain.rope_cos, plain.rope_sin = rope_tables(model.config.head_dim, model.config.max_seq_len, model.config.rope_theta)
        meta = {"source": f"pippin pretrain {out}", "steps": config.steps, "init_from": config.init_from}
        save_pippin(LoadedModel(model=plain, tokenizer=tokenizer, path=path, meta={}), path, extra_meta=meta)
    if dist.is_initialized():
        dist.barrier()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pippin.train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a PretrainConfig as JSON")
    args = p.parse_args(argv)
    per_rank = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(int(os.environ.get("PIPPIN_THREADS", per_rank)))
    res = run_pretrain(PretrainConfig.from_json(args.config))
    if not dist.is_initialized() and int(os.environ.get("RANK", "0")) == 0 and res.losses:
        print(f"pretrain: steps {res.start_step}..{res.steps}, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, model {res.model_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
