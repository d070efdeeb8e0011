"""Train a LoRA adapter on a frozen base (dense or compressed): SFT on chats, or distillation from a teacher.

`train_adapter(model, examples, config, out_dir=...)` wraps the base with one trainable fp32 LoRA slot,
optionally initialised from another adapter (AFM starts task adapters from the accuracy-recovery adapter),
and runs AdamW with linear warmup and a cosine decay, gradient accumulation and optional gradient
checkpointing. The objective is an enum: `SFT` (cross-entropy on assistant tokens), `DISTILL` (KL to a
teacher's logits on every position: accuracy recovery, the full model teaching its compressed self) or `BLOCKWISE`
(each block's LoRA matches the teacher's block outputs, one block after another: pippin.train.recovery; `steps` are
then per block and a checkpoint is taken after each block). Training runs on `device` (pippin.train.placement: a
compressed base as dense frozen weights there), optionally under bf16 autocast with fp32 LoRA weights.
Every `save_every` steps the state is checkpointed atomically; calling again with the same folder and
config resumes where a killed run stopped. Batches are drawn from a seeded generator keyed by the step,
so a resumed run sees the same data as an uninterrupted one. The result is a PEFT-format adapter folder
plus `train_config.json` and `train_log.jsonl`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from pippin.adapters.lora import LoraConfig, apply_lora, base_fingerprint, lora_modules
from pippin.adapters.peft_format import adapter_from_model, check_compatible, load_adapter, save_adapter
from pippin.errors import PippinError
from pippin.io import write_atomic, write_json_atomic
from pippin.train.checkpointing import STATE_JSON, resume, save_state
from pippin.train.data import Example, collate
from pippin.train.losses import masked_kl
from pippin.train.placement import autocast, on_device, resolve_device
from pippin.train.recovery import BlockLoss, reference_like, residual_factors, train_blockwise

if TYPE_CHECKING:
    from pippin.train.sft import SFTConfig


class Objective(StrEnum):
    SFT = "sft"
    DISTILL = "distill"
    BLOCKWISE = "blockwise"


@dataclass(kw_only=True)
class TrainConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: Objective = Objective.SFT
    steps: int = 100
    """Optimizer steps (per block for the blockwise objective)."""
    batch_size: int = 4
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    """Recompute each block in the backward pass: less memory, ~30 % more time."""
    temperature: float = 1.0
    """Distillation temperature."""
    save_every: int = 25
    seed: int = 0
    init_from: str | None = None
    """An adapter folder to start from (e.g. the recovery adapter), instead of PEFT's zero-B init."""
    init_residual: bool = False
    """Start from each layer's compression error, low-rank and weighted by calibration inputs (pippin.train.recovery):
    for recovery adapters, with the full-precision teacher. Needs a teacher; excludes init_from."""
    init_seqs: int = 8
    """Training examples whose activations weight the residual initialisation."""
    block_seqs: int = 64
    """Blockwise: training examples whose hidden states are cached for every block (3 x n x seq_len x dim fp32)."""
    device: str = "cpu"
    """Where the student and the teacher run ('cpu', 'cuda', 'cuda:1'); compressed layers train there as dense weights."""
    bf16: bool = False
    """bf16 autocast for the forward passes (LoRA weights, optimizer state and losses stay fp32)."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        self.objective = Objective(self.objective)
        for name in ("steps", "batch_size", "grad_accum", "save_every", "block_seqs"):
            if getattr(self, name) < 1:
                raise PippinError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise PippinError(f"TrainConfig.lr must be > 0, got {self.lr}.")
        if self.init_residual and self.init_from:
            raise PippinError("Start from an adapter (init_from) or from the compression residual (init_residual), not both.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objective"] = self.objective.value
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d


@dataclass(kw_only=True)
class TrainResult:
    path: Path
    steps: int
    resumed_from: int
    losses: list[float]
    seconds: float
    n_dropped: int = 0
    """Examples with no loss token left after truncation (skipped)."""


def lr_at(step: int, cfg: TrainConfig | SFTConfig) -> float:
    """Linear warmup to cfg.lr, then cosine to cfg.lr * min_lr_ratio at the last step (adapters and full SFT alike)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward pass (an instance attribute over the class's forward)."""
    for block in getattr(model, "layers", []):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def disable_grad_checkpointing(model: nn.Module) -> None:
    """Drop the wrappers `enable_grad_checkpointing` set: the model is plain again."""
    for block in getattr(model, "layers", []):
        block.__dict__.pop("forward", None)


def set_act8(model: nn.Module, value: bool | dict[str, bool]) -> dict[str, bool]:
    """Training sees the weights without 8-bit activation rounding (its gradient is zero almost everywhere)."""
    before = {n: m.act8 for n, m in model.named_modules() if hasattr(m, "act8")}
    for n, m in model.named_modules():
        if n in before:
            m.act8 = value[n] if isinstance(value, dict) else value
    return before


def _run_hash(cfg: TrainConfig, examples: list[Example], fingerprint: str) -> str:
    d = cfg.to_dict()
    for k in ("steps", "save_every", "device"):  # a resumed run may be extended, checkpoint at another pace, move
        d.pop(k)
    h = hashlib.sha256(json.dumps([d, fingerprint], sort_keys=True).encode())
    for e in examples:  # the data itself: a changed dataset must not resume an old run
        h.update(json.dumps([e.ids, e.mask]).encode())
    return h.hexdigest()[:16]


def train_adapter(
    model: nn.Module,
    examples: list[Example],
    config: TrainConfig,
    *,
    out_dir: str | Path,
    name: str,
    teacher: nn.Module | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) one adapter and write it to out_dir. The base weights stay frozen and unchanged; the model is
    left wrapped with the trained adapter active in slot 0 (`remove_lora_(model)` unwraps it), on the CPU."""
    out = Path(out_dir)
    n_given = len(examples)
    # An example whose answer was cut off by the length limit teaches nothing (and would dilute the mean).
    examples = [e for e in examples if any(e.mask[1:])]
    if not examples:
        raise PippinError(f"None of the {n_given} training examples has an answer token within the length limit; raise --seq-len.")
    if config.objective is not Objective.SFT and teacher is None:
        raise PippinError(f"The {config.objective.value} objective needs a teacher model (--teacher).")
    if config.init_residual and teacher is None:
        raise PippinError("The residual initialisation needs the full-precision teacher (--teacher).")
    device = resolve_device(config.device)
    fingerprint = base_fingerprint(model)
    ckpt = out / "checkpoint"
    residual = None
    if config.init_residual and not (ckpt / STATE_JSON).exists():  # a resumed run restores its own weights
        seqs = [torch.tensor(e.ids) for e in examples[: config.init_seqs]]
        residual = residual_factors(teacher, model, seqs, config.lora, progress=progress)
    apply_lora(model, config.lora, trainable=True)
    mods = lora_modules(model)
    if residual is not None:
        for mod, m in mods.items():
            m.load_slot(0, *residual[mod], config.lora.scaling)
    if config.init_from:
        load_init(model, config.init_from, config.lora, fingerprint=fingerprint)
    # Block-wise targets are the teacher's hidden states, which must live in the student's (maybe rotated) basis.
    if config.objective is Objective.BLOCKWISE:
        teacher = reference_like(teacher, model)
    run_hash = _run_hash(config, examples, fingerprint)
    write_json_atomic(out / "train_config.json", {"name": name, "run_hash": run_hash, "n_examples": len(examples), **config.to_dict()})
    act8 = set_act8(model, False)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.callback(set_act8, model, act8)
        stack.enter_context(on_device(model, device))
        if teacher is not None:
            stack.enter_context(on_device(teacher, device))
            teacher.eval()
        params = {f"{mod}.{ab}": getattr(m, f"lora_{ab}") for mod, m in mods.items() for ab in ("A", "B")}
        opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
        start, losses = 0, []
        if (st_meta := resume(ckpt, run=run_hash, params=params, optimizer=opt, key="run_hash")) is not None:
            start, losses = int(st_meta["step"]), list(st_meta.get("losses", []))
        amp = functools.partial(autocast, device, config.bf16)
        if config.objective is Objective.BLOCKWISE:
            log = _blockwise(model, teacher, examples, config, params, opt, ckpt, run_hash, start, losses, amp, progress)
        else:
            log = _steps(model, teacher, examples, config, name, params, opt, ckpt, run_hash, start, losses, amp, device, progress)
    write_atomic(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
    info = {
        "base_fingerprint": fingerprint,
        "init_from": config.init_from,
        "init_residual": config.init_residual,
        "objective": config.objective.value,
        "steps": config.steps,
        "final_loss": losses[-1] if losses else None,
        **(meta or {}),
    }
    save_adapter(adapter_from_model(model, config.lora, name=name, meta=info), out, base_model=info.get("base_model"))
    return TrainResult(
        path=out, steps=config.steps, resumed_from=start, losses=losses, seconds=time.perf_counter() - t0, n_dropped=n_given - len(examples)
    )


def load_init(model: nn.Module, path: str | Path, lora: LoraConfig, *, fingerprint: str, slot: int = 0) -> None:
    """Load the adapter at `path` into slot `slot` of `model`'s LoRA modules (modules it lacks get a zero update),
    refusing one trained on another base or at another rank, alpha or rslora than `lora`."""
    init = load_adapter(path)
    check_compatible(init, model, fingerprint=fingerprint, max_rank=lora.rank)
    if (init.config.alpha, init.config.use_rslora) != (lora.alpha, lora.use_rslora):
        raise PippinError(
            f"The starting adapter {path} uses alpha={init.config.alpha}, rslora={init.config.use_rslora}; train with the "
            "same settings, or the saved adapter's scale would not match the one it was trained at."
        )
    with torch.no_grad():
        for mod, m in lora_modules(model).items():
            A, B = init.weights.get(mod, (None, None))
            if A is not None and A.shape[0] != lora.rank:
                raise PippinError(f"The starting adapter {path} has rank {A.shape[0]}, but this run trains rank {lora.rank}.")
            m.load_slot(slot, A, B, init.scales.get(mod, lora.scaling) if A is not None else lora.scaling)


def _steps(model, teacher, examples, config, name, params, opt, ckpt, run_hash, start, losses, amp, device, progress) -> list[dict]:  # noqa: ANN001, PLR0913
    """The SFT / distillation loop (config.steps optimizer steps from `start`); returns the log rows."""
    if config.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {name}", disable=not progress, unit="step")
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, config)
            total = 0.0
            for micro in range(config.grad_accum):
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * config.grad_accum + micro)
                pick = torch.randint(len(examples), (config.batch_size,), generator=gen).tolist()
                inputs, targets, mask = (t.to(device) for t in collate([examples[i] for i in pick]))
                with amp():
                    if config.objective is Objective.SFT:
                        # The head (V x dim, the largest matmul) only where the loss is taken: assistant tokens.
                        logits = model.head(model.features(inputs)[mask])
                    else:
                        logits = model(inputs)
                        with torch.no_grad():
                            t_logits = teacher(inputs)
                # Losses in fp32 (both take .float() of the logits). Every batch has answer tokens: see train_adapter.
                if config.objective is Objective.SFT:
                    loss = F.cross_entropy(logits.float(), targets[mask])
                else:
                    loss = masked_kl(logits, t_logits, mask, temperature=config.temperature)
                (loss / config.grad_accum).backward()
                total += loss.item() / config.grad_accum
            if not math.isfinite(total):
                raise PippinError(f"The loss diverged at step {step} ({total}); lower the learning rate. The last checkpoint is kept.")
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr_at(step, config):.1e}")
            done = step + 1
            if done % config.save_every == 0 or done == config.steps:
                save_state(ckpt, step=done, params=params, optimizer=opt, extra={"run_hash": run_hash, "losses": losses})
    finally:
        disable_grad_checkpointing(model)
        model.eval()
    return [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]


def _blockwise(model, teacher, examples, config, params, opt, ckpt, run_hash, start, losses, amp, progress) -> list[dict]:  # noqa: ANN001, PLR0913
    """The block-wise objective on `config.block_seqs` seeded examples, a checkpoint after each block; `losses` holds
    each block's final loss, `before` (in the checkpoint too) its loss at the start."""
    gen = torch.Generator().manual_seed(config.seed)
    chosen = [examples[i] for i in torch.randperm(len(examples), generator=gen)[: config.block_seqs].tolist()]
    tokens, _, _ = collate(chosen)
    lengths = torch.tensor([len(e.ids) - 1 for e in chosen])
    before = list(json.loads((ckpt / STATE_JSON).read_text()).get("before", [])) if start else []

    def done(r: BlockLoss) -> None:
        losses.append(r.after)
        before.append(r.before)
        save_state(ckpt, step=r.block + 1, params=params, optimizer=opt, extra={"run_hash": run_hash, "losses": losses, "before": before})

    sched = lambda step: lr_at(step, config)  # noqa: E731 - per block: warmup and cosine over config.steps
    train_blockwise(
        model, teacher, tokens, lengths, steps=config.steps, batch_size=config.batch_size, schedule=sched,
        max_grad_norm=config.max_grad_norm, seed=config.seed, start=start, amp=amp, on_block=done, progress=progress,
    )  # fmt: skip
    model.eval()
    return [{"block": i, "before": b, "after": a} for i, (b, a) in enumerate(zip(before, losses))]
