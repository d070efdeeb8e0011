"""Optimizers and learning-rate schedules for pretraining, chosen by name from one config.

`build_optimizer(named_params, config)` returns a torch optimizer; `lr_at(step, config)` is AFM's schedule, a linear
warmup then a cosine decay to `final_lr_ratio` x peak (0.005 in AFM's core stage, ../shared/reference/afm.md 2.2).
"adastar" is AFM's own optimizer (train/adastar.py, afm.md 2.3) with its mup-simple update scale; `clip_grads_` is the
one gradient clip for every optimizer, and with `drop_grad_norm` it says when to skip a step (AFM: max 1, drop 100).
SGD exists so that parallel runs can be compared without an optimizer state that hides a reduction bug. Adapter and
post-training runs keep their own AdamW (train/adapter.py); this module is for `pippin pretrain`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pippin.errors import PippinError
from pippin.train.adastar import Adastar, GradNorm, clip_or_skip_

OPTIMIZERS = ("sgd", "adamw", "adastar")
MUP_BASE_DIM = 768
"""AXLearn's _BASE_MODEL_HIDDEN_DIM: the width at which mup-simple scales updates by 1."""
MUP_TARGETS = re.compile(r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)(\.base)?\.weight$")
"""The weights AXLearn's mup-simple scales: attention q/k/v/o and the FFN's linears (a wrapper's `.base` too)."""


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """One of OPTIMIZERS."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (applied to matrices only; norms, biases and embeddings-as-vectors are exempt)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float | None = None
    """Added to sqrt(second moment); None: 1e-8 for AdamW, 0 for adastar (AFM puts its eps on the square instead)."""
    momentum: float = 0.0
    """SGD only."""
    warmup_steps: int = 0
    total_steps: int = 1000
    """The step at which the cosine reaches its floor."""
    final_lr_ratio: float = 0.005
    """The floor of the decay as a fraction of the peak."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None turns clipping off."""
    drop_grad_norm: float | None = None
    """Skip a step whose global gradient norm is not finite or reaches this (AFM: 100); None skips only non-finite."""
    # adastar (train/adastar.py); defaults are AFM's golden config. Its weight_decay is per step at the peak, scaled by
    # lr_t / lr (AXLearn's decoupled rule), not multiplied by lr as in torch's AdamW: AFM uses lr 1e-2, wd 3.16e-4.
    gradient_ema_decay: float | None = None
    """adastar: Adam-style first moment (debiased); None: off, as AFM (momentum is on the normalized update)."""
    gradient_square_ema_decay: float = 0.95
    """adastar: decay of the debiased EMA of g^2 + eps_square."""
    eps_square: float = 1e-30
    """adastar: added to g^2 inside the second moment (Adafactor's eps1)."""
    raw_update_clip: float | None = 1.0
    """adastar: clip each tensor's normalized update to this RMS; None: no clip."""
    update_ema_decay: float | None = 0.95
    """adastar: decay of the EMA of clipped updates (not debiased); None: off (then with gradient_ema_decay, AdamW)."""
    mup_scale: float = 1.0
    """adastar: update multiplier of attention and FFN weights (MUP_TARGETS); AFM's is mup_simple_scale(dim) = 0.25."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise PippinError(f"optimizer {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.eps is None:
            self.eps = 0.0 if self.name == "adastar" else 1e-8
        if self.mup_scale <= 0 or (self.raw_update_clip is not None and self.raw_update_clip <= 0):
            raise PippinError("optimizer: mup_scale must be > 0 and raw_update_clip > 0 (or None)")
        if self.lr <= 0 or self.total_steps <= 0 or self.warmup_steps < 0 or not 0 <= self.final_lr_ratio <= 1:
            raise PippinError("optimizer: lr and total_steps must be positive, warmup_steps >= 0, final_lr_ratio in [0, 1]")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


def lr_at(step: int, config: OptimConfig) -> float:
    """The learning rate for 0-based `step`: linear warmup to the peak, then cosine to final_lr_ratio x peak."""
    peak, floor = config.lr, config.lr * config.final_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(config.total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mup_simple_scale(dim: int, *, base_dim: int = MUP_BASE_DIM) -> float:
    """AXLearn's mup-simple rule (Wortsman et al. 2023, arXiv 2309.14322 3.2.4): min(base_dim / dim, 1), so a model
    wider than the 768-wide base takes proportionally smaller steps on its hidden matrices (AFM, dim 3072: 0.25)."""
    return min(base_dim / dim, 1.0)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, *, mup_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices only (GPT-2/nanoGPT's rule): 1-D tensors (norm gains, biases) are not decayed.
    With mup_scale != 1, the MUP_TARGETS matrices get their own group with `update_scale` = mup_scale (adastar)."""
    decay, no_decay, scaled = [], [], []
    for name, p in named_params:
        if p.requires_grad:
            if mup_scale != 1.0 and MUP_TARGETS.search(name):
                scaled.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scaled:
        groups.append({"params": scaled, "weight_decay": weight_decay, "update_scale": mup_scale})
    return groups


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], config: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(named_params, config.weight_decay, mup_scale=config.mup_scale if config.name == "adastar" else 1.0)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.name == "adastar":
        return Adastar(
            groups,
            lr=config.lr,
            gradient_ema_decay=config.gradient_ema_decay,
            gradient_square_ema_decay=config.gradient_square_ema_decay,
            eps=config.eps,
            eps_square=config.eps_square,
            raw_update_clip=config.raw_update_clip,
            update_ema_decay=config.update_ema_decay,
        )
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def clip_grads_(params: Iterable[torch.Tensor], config: OptimConfig) -> GradNorm:
    """Clip gradients to config.max_grad_norm; `.skip` says the step must be skipped (non-finite norm, or one at or
    over config.drop_grad_norm): then call `optimizer.zero_grad()` without `optimizer.step()`."""
    return clip_or_skip_(params, max_norm=config.max_grad_norm, drop_norm=config.drop_grad_norm)


def afm_adastar(*, total_steps: int, dim: int, warmup_steps: int = 5000) -> OptimConfig:
    """AFM's core-stage optimizer (afm.md 2.2/2.3): adastar at peak 1e-2, wd 3.16e-4, mup-simple for width `dim`,
    warmup then cosine to 0.005 x peak, clip at global norm 1 and skip steps at norm 100."""
    return OptimConfig(
        name="adastar",
        lr=1e-2,
        weight_decay=3.16e-4,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        final_lr_ratio=0.005,
        max_grad_norm=1.0,
        drop_grad_norm=100.0,
        mup_scale=mup_simple_scale(dim),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
