"""Optimizers and learning-rate schedules for pretraining, chosen by name from one config.

`build_optimizer(named_params, config)` returns a torch optimizer; `lr_at(step, config)` is AFM's schedule, a linear
warmup then a cosine decay to `final_lr_ratio` x peak (0.005 in AFM's core stage, ../shared/reference/afm.md 2.2).
SGD exists so that parallel runs can be compared without an optimizer state that hides a reduction bug. Adapter and
post-training runs keep their own AdamW (train/adapter.py); this module is for `pippin pretrain`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pippin.errors import PippinError

OPTIMIZERS = ("sgd", "adamw")


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """One of OPTIMIZERS."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (applied to matrices only; norms, biases and embeddings-as-vectors are exempt)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0
    """SGD only."""
    warmup_steps: int = 0
    total_steps: int = 1000
    """The step at which the cosine reaches its floor."""
    final_lr_ratio: float = 0.005
    """The floor of the decay as a fraction of the peak."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None turns clipping off."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise PippinError(f"optimizer {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
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


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (GPT-2/nanoGPT's rule): 1-D tensors (norm gains, biases) are not decayed."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], config: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(named_params, config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
