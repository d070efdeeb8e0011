"""Talaria's quality predictor: each op's sensitivity at each bit width, summed over a plan into a predicted ΔKL.

Where the per-layer costs come from, best first:
- stored: `sensitivity.json` next to a compressed model, the allocator's own estimates (Fisher-scaled output error of
  each layer at each candidate width) that `pippin compress` writes when it allocates;
- weights: `sensitivity_from_weights`, k-means palettes fitted to a full-precision model's weights, each layer's cost
  its output error (weighted by input activation moments when calibration tokens are given);
- prior: no data at all, every weight alike: cost = the op's share of parameters times the relative error of the
  optimal quantizer of a Gaussian at that width (Max 1960; Panter-Dite above 5 bits).
Predicted ΔKL = scale * sum of costs: layers are assumed independent (no interaction terms, as HAWQ/MBP allocators
assume) and dense widths lossless. `calibrate_predictor` fits the scale to plans whose KL was measured
(`pippin eval fidelity`) and reports its error; without it the numbers are a ranking more than a forecast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pippin.errors import PippinError
from pippin.model.config import ModelConfig
from pippin.quant.compress import SENSITIVITY_FILE, TARGETS
from pippin.quant.pack import SUPPORTED_BITS
from pippin.quant.palettize import fit_palette
from pippin.talaria.ops import ops_table
from pippin.talaria.plan import DENSE_BITS, Plan, is_linear

GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}
"""Mean squared error of the optimal (Lloyd-Max) quantizer of a unit Gaussian, by bits (J. Max, IRE Trans. IT 1960)."""
PRIOR_KL_SCALE = 26.0
"""ΔKL (nats per token) per unit of prior cost, and the act8 term below: fitted with `calibrate_predictor` to the KL
`pippin eval fidelity` measured on 5 SmolLM2-135M-Instruct plans (two at 3.5 bpw, 5.5 and 6.1 bpw with a LUT embedding,
6.5 bpw with an int8 one; all with error feedback and act8, none rotated; KL 0.04-0.66; 2026-12-06): mean relative
error 8 %, leave-one-out 14 %. Five plans, two of them alike: weak evidence. The prior knows nothing of rotations (the
rotated 3.5 bpw model measured 0.42 where it predicts 0.64) or of other models; calibrate for those."""
PRIOR_ACT8_KL = 0.028
PRIOR_FIT = "prior, fitted on 5 SmolLM2-135M plans: mean error 8 %, leave-one-out 14 %"


def relative_mse(bits: int) -> float:
    """Relative squared error of a b-bit optimal quantizer on Gaussian weights; 0 for dense widths."""
    if bits in DENSE_BITS:
        return 0.0
    return GAUSSIAN_MSE.get(bits, math.pi * math.sqrt(3) / 2 * 4.0**-bits)  # Panter-Dite asymptote


@dataclass(kw_only=True)
class Calibration:
    """A fitted scale and how well it predicts the measured KLs it was fitted on."""

    scale: float
    act8_kl: float
    """ΔKL added to every plan with 8-bit activations."""
    n_plans: int
    mean_rel_error: float
    """Mean |predicted - measured| / measured over the plans."""
    loo_mean_rel_error: float | None
    """The same with each plan left out of the fit that predicts it (None with fewer than 3 plans)."""
    points: list[dict[str, float]] = field(default_factory=list)
    """Each plan's raw cost, measured KL and predicted KL."""


@dataclass(kw_only=True)
class Sensitivity:
    """Each op's cost at each width, and the scale that turns a summed cost into ΔKL."""

    costs: dict[str, dict[int, float]]
    """op -> bits -> cost (in the source's own units)."""
    source: str
    """Where the costs came from (prior / stored: PATH / weights), said next to every prediction."""
    scale: float
    act8_kl: float = 0.0
    """ΔKL of 8-bit activations' rounding, added to plans with act8 (no op's cost covers it)."""
    calibration: Calibration | None = None

    def cost(self, name: str, bits: int) -> float:
        """An op's cost at a width; widths the source lacks are extrapolated from its nearest width along the prior's
        curve, and ops it lacks (an embedding the allocator never priced) cost nothing."""
        if bits in DENSE_BITS:
            return 0.0
        table = self.costs.get(name)
        if not table:
            return 0.0
        if bits in table:
            return table[bits]
        near = min(table, key=lambda b: abs(b - bits))
        return table[near] * relative_mse(bits) / relative_mse(near)

    def op_kl(self, plan: Plan) -> dict[str, float]:
        """Predicted ΔKL of each op of a plan."""
        return {name: self.scale * self.cost(name, b) for name, b in plan.bits.items()}

    def predict(self, plan: Plan) -> float:
        return sum(self.op_kl(plan).values()) + (self.act8_kl if plan.act8 else 0.0)

    def calibrated(self, measured: list[tuple[Plan, float]]) -> Sensitivity:
        """A copy whose scale (and act8 term) are fitted to measured (plan, KL) pairs."""
        cal = calibrate_predictor(measured, sensitivity=self)
        return Sensitivity(costs=self.costs, source=self.source, scale=cal.scale, act8_kl=cal.act8_kl, calibration=cal)


def prior_sensitivity(plan: Plan, params: dict[str, int]) -> Sensitivity:
    """No data: each weight-bearing op's share of the parameters times the Gaussian quantizer's relative error."""
    total = sum(params.get(n, 0) for n in plan.bits) or 1
    costs = {n: {b: params[n] / total * relative_mse(b) for b in SUPPORTED_BITS} for n in plan.bits if is_linear(n) or n == "embed_tokens"}
    return Sensitivity(costs=costs, source=PRIOR_FIT, scale=PRIOR_KL_SCALE, act8_kl=PRIOR_ACT8_KL)


def load_sensitivity(folder: str | Path, *, plan: Plan, params: dict[str, int]) -> Sensitivity | None:
    """The allocator's stored estimates next to a compressed model (`sensitivity.json`), or None. Ops it lacks (the
    embedding) take the prior; the scale is provisional: the prior's, carried over by matching the two at a uniform
    4-bit plan, until `calibrated` fits one."""
    path = Path(folder) / SENSITIVITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        costs = {name: {int(b): float(c) for b, c in row.items()} for name, row in data["costs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PippinError(f"{path} is not a sensitivity table ({e}); delete it or recompress.") from e
    prior = prior_sensitivity(plan, params)
    table = Sensitivity(costs=costs, source="", scale=1.0)
    stored_sum = sum(table.cost(n, 4) for n in costs)  # both at a uniform 4-bit plan of the table's layers
    prior_sum = sum(prior.cost(n, 4) for n in costs)
    ratio = stored_sum / prior_sum if prior_sum > 0 and stored_sum > 0 else 1.0
    # The prior's costs for ops the table lacks, converted to the table's units.
    merged = {n: {b: c * ratio for b, c in row.items()} for n, row in prior.costs.items() if n not in costs} | costs
    source = f"stored: {path} (scale carried over from the prior)"
    return Sensitivity(costs=merged, source=source, scale=PRIOR_KL_SCALE / ratio, act8_kl=PRIOR_ACT8_KL)


def sensitivity_for(cfg: ModelConfig, plan: Plan, *, folder: str | Path | None) -> Sensitivity:
    """The quality predictor for a model: the allocator's stored estimates in its folder, else the prior."""
    params = {r.name: r.params for r in ops_table(cfg, plan, context=1, prefill=1)}
    stored = load_sensitivity(folder, plan=plan, params=params) if folder else None
    return stored or prior_sensitivity(plan, params)


@torch.no_grad()
def sensitivity_from_weights(
    model: nn.Module,
    *,
    bits: tuple[int, ...] = (2, 3, 4),
    group_size: int = 16,
    moments: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[int, float]]:
    """Each full-precision linear's cost at each width: the squared error of its k-means palette's weights, weighted
    per input channel by E[x^2] (`moments`, e.g. from pippin.quant.calibrate.input_moments), i.e. the output error
    per token; unweighted without moments. A proxy: no gradient, no error feedback, so it ranks layers rather than
    predicting KL until calibrated. Cost: one k-means per layer and width."""
    costs: dict[str, dict[int, float]] = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS):
            continue
        w = m.weight.detach().float()
        imp = moments.get(name) if moments else None
        scale = imp.float() if imp is not None else torch.ones(w.shape[1])
        costs[name] = {}
        for b in bits:
            err = fit_palette(w, bits=b, group_size=group_size, importance=imp).dequantize() - w
            costs[name][b] = float((err.pow(2) * scale).sum())
    if not costs:
        raise PippinError("This model has no full-precision linear layers to measure (is it compressed already?).")
    return costs


def calibrate_predictor(measured: list[tuple[Plan, float]], *, sensitivity: Sensitivity) -> Calibration:
    """Fit ΔKL = scale * cost (+ act8_kl for plans with 8-bit activations, whose rounding no op's cost covers) to plans
    with measured KL, minimizing the squared relative error so that plans from 0.04 to 0.7 nats weigh alike. The act8
    term is fitted only from 3 plans up, and only where some plans use act8. Reports the mean relative error on the
    plans and, from 3 plans up, with each plan left out of the fit that predicts it."""
    pts = [(sum(sensitivity.cost(n, b) for n, b in plan.bits.items()), float(plan.act8), float(kl)) for plan, kl in measured]
    if not pts:
        raise PippinError("Calibrating the quality predictor needs at least one plan with a measured KL.")
    if any(kl <= 0 for *_, kl in pts) or any(c <= 0 for c, *_ in pts):
        raise PippinError("Each calibration plan needs a positive measured KL and at least one compressed op.")
    scale, offset = _fit(pts)
    rel = [abs(scale * c + offset * a - m) / m for c, a, m in pts]
    loo = None
    if len(pts) >= 3:
        errs = []
        for i, (c, a, m) in enumerate(pts):
            s, o = _fit(pts[:i] + pts[i + 1 :])
            errs.append(abs(s * c + o * a - m) / m)
        loo = sum(errs) / len(errs)
    return Calibration(
        scale=scale,
        act8_kl=offset,
        n_plans=len(pts),
        mean_rel_error=sum(rel) / len(rel),
        loo_mean_rel_error=loo,
        points=[{"cost": c, "act8": bool(a), "measured_kl": m, "predicted_kl": scale * c + offset * a} for c, a, m in pts],
    )


def _fit(pts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(scale, act8 offset) minimizing sum(((s c + o a - m) / m)^2): each row (c/m, a/m) . (s, o) ~ 1."""
    xs = [(c / m, a / m) for c, a, m in pts]
    scale_only = (sum(x for x, _ in xs) / sum(x * x for x, _ in xs), 0.0)
    if len(pts) < 3 or not any(a for _, a, _ in pts):
        return scale_only
    sxx = sum(x * x for x, _ in xs)
    syy = sum(y * y for _, y in xs)
    sxy = sum(x * y for x, y in xs)
    sx, sy = sum(x for x, _ in xs), sum(y for _, y in xs)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-12 * sxx * syy:  # every plan act8, costs proportional: the two terms cannot be told apart
        return scale_only
    s, o = (sx * syy - sy * sxy) / det, (sy * sxx - sx * sxy) / det
    return (s, o) if s > 0 and o >= 0 else scale_only
