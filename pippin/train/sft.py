"""Full fine-tuning (SFT) of every weight of a full-precision model on chats, with sequence packing.

`train_sft(loaded, examples, config, out_dir=...)` packs the tokenized examples into rows of `seq_len` slots
(pippin.train.data.pack: a block-diagonal causal mask and positions restarting at each example, so a packed row
computes exactly what its examples would alone) and trains with AdamW (no decay on norms), linear warmup and a cosine
decay (`lr_at`, shared with adapter training), gradient accumulation, clipping and optional gradient checkpointing.
The loss is the mean cross-entropy over the step's loss tokens (assistant replies), however they fall into rows and
micro-batches. Rows are shuffled per epoch from the seed and each step's rows follow from its number, so a killed run
resumes (from the checkpoint written every `save_every` steps) to the same weights as an uninterrupted one; a
checkpoint of another config, data or base is refused. Compressed (palettized) models are refused: train the full
model, then compress it. LoRA SFT on a frozen base is pippin.train.adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pippin.adapters.lora import base_fingerprint
from pippin.errors import PippinError
from pippin.io import write_atomic, write_json_atomic
from pippin.model.checkpoint import LoadedModel, save_pippin
from pippin.train.adapter import disable_grad_checkpointing, enable_grad_checkpointing, lr_at
from pippin.train.checkpointing import resume, save_state
from pippin.train.data import Example, Packed, PackStats, block_causal_mask, pack


@dataclass(kw_only=True)
class SFTConfig:
    steps: int = 0
    """Optimizer steps; 0: as many as `epochs` passes over the packed rows take."""
    epochs: float = 1.0
    batch_size: int = 4
    """Packed rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 1024
    """Slots per packed row; an example of more than seq_len + 1 tokens is cut to that."""
    lr: float = 2e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW decay of the matrices (embeddings included); norms are never decayed."""
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    """Recompute each block in the backward pass: less memory, ~30 % more time."""
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "seq_len", "save_every"):
            if getattr(self, name) < 1:
                raise PippinError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.steps < 0 or self.warmup_steps < 0:
            raise PippinError("SFTConfig.steps and warmup_steps must be >= 0.")
        if self.steps == 0 and not self.epochs > 0:
            raise PippinError(f"SFTConfig needs steps >= 1 or epochs > 0, got epochs={self.epochs}.")
        if not self.lr > 0 or self.weight_decay < 0 or not self.max_grad_norm > 0:
            raise PippinError("SFTConfig: lr and max_grad_norm must be > 0 and weight_decay >= 0.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class SFTResult:
    path: Path
    """The trained model: a pippin checkpoint folder (out_dir/model)."""
    steps: int
    resumed_from: int
    losses: list[float]
    packing: PackStats
    seconds: float


def packed_loss(model: torch.nn.Module, rows: Packed, index: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the loss tokens of rows[index]; the head, the largest matmul, runs only there."""
    device = next(model.parameters()).device
    take = lambda t: t[index].to(device)  # noqa: E731
    inputs, targets, mask, segments = take(rows.inputs), take(rows.targets), take(rows.loss_mask), take(rows.segments)
    h = model.features(inputs, positions=take(rows.positions), mask=block_causal_mask(segments))
    logits = model.head(h[mask])
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum")


def _run_hash(cfg: SFTConfig, examples: list[Example], fingerprint: str) -> str:
    d = cfg.to_dict()
    for k in ("steps", "epochs", "save_every"):  # a resumed run may be extended or checkpoint at another pace
        d.pop(k)
    h = hashlib.sha256(json.dumps([d, fingerprint], sort_keys=True).encode())
    for e in examples:  # the data itself: a changed dataset must not resume an old run
        h.update(json.dumps([e.ids, e.mask]).encode())
    return h.hexdigest()[:16]


def _step_rows(step: int, cfg: SFTConfig, n_rows: int) -> list[torch.Tensor]:
    """The row indices of each micro-batch of `step`: consecutive slices of per-epoch seeded shuffles."""
    perms: dict[int, torch.Tensor] = {}
    out = []
    for micro in range(cfg.grad_accum):
        first = (step * cfg.grad_accum + micro) * cfg.batch_size
        idx = []
        for j in range(first, first + cfg.batch_size):
            epoch, k = divmod(j, n_rows)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            idx.append(int(perms[epoch][k]))
        out.append(torch.tensor(idx))
    return out


def train_sft(
    loaded: LoadedModel,
    examples: list[Example],
    config: SFTConfig,
    *,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> SFTResult:
    """Train every weight of loaded.model in place (or resume a killed run in out_dir) and save it to out_dir/model
    with its tokenizer; the run folder also holds sft_config.json, train_log.jsonl and checkpoint/. `meta` goes into
    the saved model's config.json next to the SFT settings."""
    if "quantization" in loaded.meta:
        raise PippinError(
            f"{loaded.path} is compressed; full fine-tuning trains full-precision weights. Fine-tune the uncompressed model "
            "and compress the result, or train a LoRA adapter on this one (`pippin adapter train`)."
        )
    model = loaded.model
    if config.seq_len > model.config.max_seq_len:
        raise PippinError(f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}.")
    out = Path(out_dir)
    rows = pack(examples, seq_len=config.seq_len)
    n_rows = rows.stats.n_rows
    config = replace(config, steps=config.steps or math.ceil(config.epochs * n_rows / (config.batch_size * config.grad_accum)))
    fingerprint = base_fingerprint(model)  # of the starting weights, before a resume overwrites them
    run_hash = _run_hash(config, examples, fingerprint)
    params = dict(model.requires_grad_(True).named_parameters())
    matrices, norms = [p for p in params.values() if p.ndim >= 2], [p for p in params.values() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": norms, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=config.lr)
    ckpt = out / "checkpoint"
    start, losses = 0, []
    if (st := resume(ckpt, run=run_hash, params=params, optimizer=opt, key="run_hash")) is not None:
        start, losses = int(st["step"]), list(st.get("losses", []))
        if start > config.steps:
            raise PippinError(f"{ckpt} is at step {start}, past this run's {config.steps} steps; ask for more steps or another folder.")
    packing = rows.stats.to_dict()
    write_json_atomic(
        out / "sft_config.json",
        {"run_hash": run_hash, "base_fingerprint": fingerprint, "n_examples": len(examples), "packing": packing, **config.to_dict()},
    )
    if config.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="sft", disable=not progress, unit="step")
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, config)
            micro = _step_rows(step, config, n_rows)
            # Every row holds loss tokens (pack drops examples without), so n_loss >= batch_size.
            n_loss = sum(int(rows.loss_mask[idx].sum()) for idx in micro)
            total = 0.0
            for idx in micro:
                loss_sum = packed_loss(model, rows, idx)
                (loss_sum / n_loss).backward()  # the step's token mean, whatever the split into micro-batches
                total += loss_sum.item() / n_loss
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
    write_atomic(out / "train_log.jsonl", "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)).encode())
    name = loaded.meta.get("name") or loaded.path.name
    info = {"name": f"{name}-sft", "base_model": name, **(meta or {})}
    info["sft"] = {**config.to_dict(), "packing": packing, "final_loss": losses[-1] if losses else None}
    path = save_pippin(LoadedModel(model=model, tokenizer=loaded.tokenizer, path=out / "model", meta=info), out / "model")
    return SFTResult(path=path, steps=config.steps, resumed_from=start, losses=losses, packing=rows.stats, seconds=time.perf_counter() - t0)
