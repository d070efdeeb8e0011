"""AFM's optimizer "adastar" (an RMSProp-with-momentum family) and AFM's skip-or-clip of anomalous gradients.

Follows AXLearn's `optimizers.adastar_optimizer` and `skip_and_clip_by_global_norm` (apple/axlearn; reference:
../shared/reference/afm.md 2.3). Per parameter, with t the step count (from 1):
    m_t = b1 m + (1-b1) g            (optional Adam first moment, debiased or not)
    v_t = b2 v + (1-b2) (g^2 + eps_square),  v^ = v_t / (1 - b2^t) if debiased
    u = m^ / (sqrt(v^) + eps);  u /= max(1, rms(u) / raw_update_clip)      (block-RMS clip, as AXLearn)
    s_t = b3 s + (1-b3) u            (optional EMA of updates, AFM: not debiased)
    p -= lr_t * update_scale * s^ + (lr_t / peak_lr) * weight_decay * p
Weight decay is scaled by the schedule only (lr_t / peak_lr), not by the learning rate: AXLearn's decoupled rule, so
AFM's wd 3.16e-4 is a per-step decay at the peak. Not here: param EMA, factored second moments. Works on DTensor
parameters: every op is elementwise except the clip's norm, which DTensor reduces over all shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


class Adastar(torch.optim.Optimizer):
    """AXLearn's adastar. Defaults are AFM's golden config except the learning rate (0.01 there) and weight decay.

    The learning rate of a group is the scheduled one (set it each step, e.g. with optim.set_lr); `peak_lr` is the
    schedule's peak, used to scale weight decay by lr_t / peak_lr. `update_scale` multiplies a group's update but
    not its weight decay (AFM's mup-simple scale). State per parameter: `step` (scalar tensor), `gradient_square_ema`,
    plus `gradient_ema` / `update_ema` when those are on; all plain tensors (or DTensors shaped like the parameter).
    """

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        peak_lr: float | None = None,
        gradient_ema_decay: float | None = None,
        gradient_ema_debias: bool = True,
        gradient_square_ema_decay: float = 0.95,
        gradient_square_ema_debias: bool = True,
        eps: float = 0.0,
        eps_square: float = 1e-30,
        raw_update_clip: float | None = 1.0,
        update_ema_decay: float | None = 0.95,
        update_ema_debias: bool = False,
        weight_decay: float = 0.0,
        update_scale: float = 1.0,
    ) -> None:
        if lr <= 0 or not 0 <= gradient_square_ema_decay < 1 or (raw_update_clip is not None and raw_update_clip <= 0):
            raise ValueError("adastar: lr must be > 0, gradient_square_ema_decay in [0, 1), raw_update_clip > 0 or None")
        defaults = dict(
            lr=lr,
            peak_lr=lr if peak_lr is None else peak_lr,
            gradient_ema_decay=gradient_ema_decay,
            gradient_ema_debias=gradient_ema_debias,
            gradient_square_ema_decay=gradient_square_ema_decay,
            gradient_square_ema_debias=gradient_square_ema_debias,
            eps=eps,
            eps_square=eps_square,
            raw_update_clip=raw_update_clip,
            update_ema_decay=update_ema_decay,
            update_ema_debias=update_ema_debias,
            weight_decay=weight_decay,
            update_scale=update_scale,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # a CPU scalar, as torch's AdamW (DCP saves it replicated)
            state["gradient_square_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["gradient_ema_decay"] is not None:
                state["gradient_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["update_ema_decay"] is not None:
                state["update_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("adastar does not support sparse gradients")
                self._update(p, p.grad, self._init_state(p, group), group)
        return loss

    @staticmethod
    def _update(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] += 1
        t = state["step"].item()
        # Stage 1: the normalized update u = m^ / (sqrt(v^) + eps).
        b2 = group["gradient_square_ema_decay"]
        v = state["gradient_square_ema"]
        v.mul_(b2).addcmul_(g, g, value=1 - b2).add_((1 - b2) * group["eps_square"])
        denom = v.sqrt()
        if group["gradient_square_ema_debias"]:
            denom.div_(math.sqrt(1 - b2**t))
        denom.add_(group["eps"])
        b1 = group["gradient_ema_decay"]
        if b1 is not None:
            m = state["gradient_ema"]
            m.lerp_(g, 1 - b1)
            u = m / denom
            if group["gradient_ema_debias"]:
                u.div_(1 - b1**t)
        else:
            u = g / denom
        clip = group["raw_update_clip"]
        if clip is not None:
            # Block RMS over the whole tensor: on a sharded DTensor the norm is reduced over all shards.
            rms = torch.linalg.vector_norm(u) / math.sqrt(u.numel())
            u.div_(torch.clamp(rms / clip, min=1.0))
        b3 = group["update_ema_decay"]
        if b3 is not None:
            s = state["update_ema"]
            s.lerp_(u, 1 - b3)
            u = s / (1 - b3**t) if group["update_ema_debias"] else s
        # Stage 2: learning rate and decoupled weight decay, both under the schedule.
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1 - group["weight_decay"] * lr / group["peak_lr"])
        p.add_(u.to(p.dtype), alpha=-lr * group["update_scale"])


@dataclass(kw_only=True)
class GradNorm:
    """What `clip_or_skip_` saw: the global gradient norm before clipping and whether to skip the step."""

    norm: float
    """Global L2 norm of all gradients, before clipping (inf or nan when a gradient is not finite)."""
    skip: bool
    """True when the norm is not finite or reaches drop_norm: do not call optimizer.step() (AXLearn's skip)."""


def clip_or_skip_(params: Iterable[torch.Tensor], *, max_norm: float | None, drop_norm: float | None) -> GradNorm:
    """AXLearn's `skip_and_clip_by_global_norm` for any torch optimizer: clip gradients in place to global norm
    `max_norm` (None: no clip) and report `skip` when the norm is not finite or >= `drop_norm` (AFM: max 1, drop 100).

    A skipped step must leave weights and optimizer state as they were, so the caller skips `optimizer.step()`
    (and zeroes the gradients as usual). Works with FSDP2/DTensor gradients (torch's total-norm helpers)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return GradNorm(norm=0.0, skip=False)
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    # A DTensor norm (FSDP2): full_tensor() is the global value on every rank.
    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    skip = not math.isfinite(norm) or (drop_norm is not None and norm >= drop_norm)
    if not skip and max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return GradNorm(norm=norm, skip=skip)
