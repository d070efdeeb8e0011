"""FFN-width pruning with learned Soft-Top-K masks, and export of the smaller dense model (AFM-on-device, afm.md 2.4).

`apply_ffn_masks(model, config)` wraps every `mlp.down_proj` in an `FFNMask` that multiplies its input (the FFN's
hidden channels) by a mask over learned per-channel scores; the model class is untouched and the wrapper is found by
name, as pippin.adapters installs LoRA. The soft mask is the binary-entropy-regularized top-k of the scores,
m_i = sigmoid((s_i - tau) / T) with tau solved numerically so that sum(m) = k: the Limited Multi-Label
projection (Amos, Xu, Kolter 2019, arXiv 1905.10421), the "Soft-Top-K" AFM names in place of Sheared-LLaMA's
HardConcrete (Xia et al. 2023, arXiv 2310.06694). Its gradient flows through tau implicitly. The width k shrinks from
the full width to the target over the first part of mask learning (Sheared-LLaMA's sparsity warmup) while T anneals
geometrically, so the masks learn jointly with the weights and end near binary. `export_pruned` keeps each layer's
top-k channels (gate/up rows, down columns) and returns a plain Transformer with the smaller ffn_dim. Not here:
pruning heads, layers or the model width (AFM prunes the FFN only), per-layer widths (ModelConfig has one ffn_dim).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from pippin.errors import PippinError
from pippin.model.checkpoint import build_model
from pippin.model.transformer import Transformer


@dataclass(kw_only=True)
class PruneConfig:
    keep_ratio: float = 0.5
    """Fraction of FFN channels every layer keeps (one width for all layers, as ModelConfig has one ffn_dim)."""
    temperature_start: float = 1.0
    """Soft-Top-K temperature at the first mask step (in units of the scores)."""
    temperature_end: float = 0.02
    """Temperature at the last mask step (geometric anneal); small enough that the mask is nearly binary."""
    ramp_fraction: float = 0.5
    """Fraction of the mask steps over which the kept width goes linearly from all channels to the target."""

    def __post_init__(self) -> None:
        if not 0 < self.keep_ratio <= 1 or not 0 <= self.ramp_fraction <= 1:
            raise PippinError("prune: keep_ratio must be in (0, 1] and ramp_fraction in [0, 1]")
        if not 0 < self.temperature_end <= self.temperature_start:
            raise PippinError("prune: temperatures must satisfy 0 < temperature_end <= temperature_start")

    def keep(self, ffn_dim: int) -> int:
        """The exported width: round(keep_ratio x ffn_dim), at least 1."""
        return max(1, round(self.keep_ratio * ffn_dim))


def soft_top_k(scores: torch.Tensor, k: float, temperature: float, *, rounds: int = 8, grid: int = 32) -> torch.Tensor:
    """A mask in [0, 1] over `scores` (n,) that sums to k: sigmoid((s - tau) / T), tau by bracketing then Newton.

    tau is bracketed by `rounds` of a `grid`-point search (a bisection that narrows the bracket grid-fold per round,
    in a few large ops instead of many tiny ones), then polished by two Newton steps; all without autograd. It is
    re-attached with its implicit derivative d tau / d s_j = m'_j / sum(m'), m' = m (1 - m), so the mask's Jacobian
    is that of the exact constrained solution. As T -> 0 the mask tends to the hard top-k."""
    n = scores.shape[-1]
    if k >= n:
        return torch.ones_like(scores)
    if k <= 0:
        return torch.zeros_like(scores)
    with torch.no_grad():
        s = scores.detach().double()
        lo = s.min() - 40 * temperature  # sum(m) ~ n here ...
        hi = s.max() + 40 * temperature  # ... and ~ 0 here; sum(m) falls monotonically in tau
        steps = torch.linspace(0, 1, grid + 1, dtype=s.dtype, device=s.device)
        for _ in range(rounds):
            taus = lo + (hi - lo) * steps  # (G+1,)
            sums = torch.sigmoid((s - taus[:, None]) / temperature).sum(-1)  # (G+1,), decreasing
            i = (sums > k).sum().clamp(1, grid)  # taus[:i] give too many channels
            lo, hi = taus[i - 1], taus[i]
        tau = (lo + hi) / 2
        for _ in range(2):  # Newton on sum(m) = k: d sum / d tau = -sum(m') / T
            m = torch.sigmoid((s - tau) / temperature)
            tau = tau + (m.sum() - k) * temperature / (m * (1 - m)).sum().clamp_min(1e-300)
        m = torch.sigmoid((s - tau) / temperature)
        w = m * (1 - m)
        w = (w / w.sum().clamp_min(1e-300)).to(scores.dtype)
    tau = tau.to(scores.dtype) + (w * (scores - scores.detach())).sum()  # value tau, gradient d tau / d s
    return torch.sigmoid((scores - tau) / temperature)


def hard_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 on the k highest scores, 0 elsewhere (ties broken by index, as torch.topk)."""
    mask = torch.zeros_like(scores)
    return mask.scatter_(-1, kept_channels(scores, k), 1.0)


def kept_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in increasing channel order."""
    return torch.topk(scores.detach(), k).indices.sort().values


class FFNMask(nn.Module):
    """down_proj(x * mask): masks the FFN's hidden channels; `scores` (ffn_dim,) are the learned logits."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.scores = nn.Parameter(torch.zeros(base.in_features, device=base.weight.device))
        self.keep: float = float(base.in_features)
        """Channels the soft mask sums to (a float while the width ramps down)."""
        self.temperature = 1.0
        self.hard = False
        """Use the hard top-round(keep) mask (what export keeps) instead of the soft one."""

    def mask(self) -> torch.Tensor:
        if self.hard:
            return hard_top_k(self.scores, round(self.keep))
        return soft_top_k(self.scores, self.keep, self.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x * self.mask().to(x.dtype))

    def extra_repr(self) -> str:
        return f"keep={self.keep:g}, temperature={self.temperature:g}, hard={self.hard}"


def ffn_masks(model: nn.Module) -> dict[str, FFNMask]:
    """Mask wrappers by module name, e.g. 'layers.0.mlp.down_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FFNMask)}


def apply_ffn_masks(model: Transformer) -> dict[str, FFNMask]:
    """Wrap every `mlp.down_proj` in place (scores start equal; the full width is kept until set_masks_)."""
    if ffn_masks(model):
        raise PippinError("The model already has FFN masks.")
    targets = [n for n, m in model.named_modules() if n.endswith("mlp.down_proj") and isinstance(m, nn.Linear)]
    if not targets:
        raise PippinError("No mlp.down_proj linear in the model: FFN pruning needs a pippin Transformer.")
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, FFNMask(getattr(owner, leaf)))
    return ffn_masks(model)


def mask_schedule(step: int, total_steps: int, ffn_dim: int, config: PruneConfig) -> tuple[float, float]:
    """(keep, temperature) at 0-based mask step `step` of `total_steps`: keep falls linearly from ffn_dim to the
    target over the first ramp_fraction of the steps, the temperature anneals geometrically over all of them."""
    frac = min(step / max(total_steps - 1, 1), 1.0)
    ramp = min(frac / config.ramp_fraction, 1.0) if config.ramp_fraction > 0 else 1.0
    keep = ffn_dim + (config.keep(ffn_dim) - ffn_dim) * ramp
    temperature = config.temperature_start * (config.temperature_end / config.temperature_start) ** frac
    return keep, temperature


def set_masks_(model: nn.Module, *, keep: float, temperature: float, hard: bool = False) -> None:
    """Set every mask's width, temperature and mode (the one place they change)."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise PippinError(f"prune: the temperature must be positive, got {temperature}")
    for m in ffn_masks(model).values():
        m.keep, m.temperature, m.hard = keep, temperature, hard


def export_pruned(model: Transformer, keep: int) -> Transformer:
    """A new dense Transformer with ffn_dim = keep holding each layer's top-`keep` channels by score; its logits equal
    the masked model's with hard masks. The masked model is left as it is."""
    masks = ffn_masks(model)
    if not masks:
        raise PippinError("The model has no FFN masks to export; call apply_ffn_masks and train them first.")
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(".scores"):
            continue
        state[name.replace("mlp.down_proj.base.", "mlp.down_proj.")] = t.detach().clone()
    for name, m in masks.items():
        prefix = name.removesuffix("down_proj")
        idx = kept_channels(m.scores, keep)
        state[prefix + "gate_proj.weight"] = state[prefix + "gate_proj.weight"][idx]
        state[prefix + "up_proj.weight"] = state[prefix + "up_proj.weight"][idx]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, idx]
    cfg = dataclasses.replace(model.config, ffn_dim=keep)
    return build_model(cfg, {k: v.contiguous() for k, v in state.items()}, source="pruned model")
