"""What-if: change how ops are stored (rules or explicit selections) and see size, decode, prefill, energy and quality
at once; "auto" solves for a target; the result is written as a plan `pippin compress --plan` accepts.

A rule is `PATTERN=BITS` (fnmatch on op names: "*.down_proj=3", "layers.0.*=4", "embed_tokens=8"); it sets every op it
matches that can take that width, and one that matches nothing is an error. `auto` keeps the non-linear ops as they are
and chooses each linear's width among candidates so that decode latency, size or energy per token meets the target at
the least predicted ΔKL: the same multiple-choice knapsack as the bpw allocator (`pippin.quant.allocate`), with the
target's resource in place of bits. Follows Talaria's simulate-then-apply loop (Hohman et al., CHI 2024).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pippin.errors import PippinError
from pippin.io import write_json_atomic
from pippin.model.config import ModelConfig
from pippin.quant.allocate import LayerChoice, allocate
from pippin.talaria.devices import DeviceProfile
from pippin.talaria.ops import OpRow, ops_table
from pippin.talaria.plan import DENSE_BITS, Plan, allowed_bits, is_linear
from pippin.talaria.quality import Sensitivity
from pippin.talaria.roofline import Estimate, estimate, estimate_op


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Store every op whose name matches `pattern` (fnmatch) at `bits`."""

    pattern: str
    bits: int

    @classmethod
    def parse(cls, text: str) -> Rule:
        pattern, sep, bits = text.rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise PippinError(f"A rule looks like 'PATTERN=BITS' (e.g. '*.down_proj=3'), not {text!r}.")
        return cls(pattern=pattern.strip(), bits=int(bits))


def apply_rules(plan: Plan, rules: list[Rule], *, tied: bool = True) -> Plan:
    """The plan with each rule applied in order (a later rule wins where two match)."""
    for rule in rules:
        matched = [n for n in plan.bits if fnmatch.fnmatchcase(n, rule.pattern)]
        fits = {n: rule.bits for n in matched if rule.bits in allowed_bits(n, tied=tied)}
        if not fits:
            why = f"matches {matched[:3]}, which cannot take {rule.bits} bits" if matched else "matches no op with weights"
            raise PippinError(f"The rule {rule.pattern}={rule.bits} {why}; op names look like layers.0.mlp.down_proj, embed_tokens.")
        plan = plan.with_bits(fits, tied=tied)
    return plan


@dataclass(kw_only=True)
class WhatIf:
    """A plan priced: its table, its estimate on a device, and its predicted quality change."""

    plan: Plan
    rows: list[OpRow]
    estimate: Estimate
    op_kl: dict[str, float]
    """Predicted ΔKL of each op with weights."""
    predicted_kl: float
    quality_source: str

    def summary(self) -> dict[str, Any]:
        return {**self.estimate.summary(), "predicted_kl": self.predicted_kl, "quality_source": self.quality_source}

    def table(self) -> list[dict[str, Any]]:
        """One dict per op: its counts (OpRow), its estimate (OpEstimate) and its predicted ΔKL ('kl')."""
        rows = []
        for r, e in zip(self.rows, self.estimate.ops, strict=True):
            d = r.to_dict() | {k: v for k, v in dataclasses.asdict(e).items() if k != "name"}
            rows.append(d | {"kl": self.op_kl.get(r.name, 0.0)})
        return rows


def simulate(
    cfg: ModelConfig, plan: Plan, profile: DeviceProfile, *, sensitivity: Sensitivity, context: int = 512, prefill: int = 512
) -> WhatIf:
    """Price a plan: size, decode and prefill latency, energy, predicted ΔKL."""
    rows = ops_table(cfg, plan, context=context, prefill=prefill)
    op_kl = sensitivity.op_kl(plan)
    return WhatIf(
        plan=plan,
        rows=rows,
        estimate=estimate(rows, profile, context=context, prefill=prefill),
        op_kl=op_kl,
        predicted_kl=sensitivity.predict(plan),
        quality_source=sensitivity.source,
    )


class TargetKind(StrEnum):
    DECODE_MS = "decode_ms"
    """Decode latency per token, milliseconds."""
    SIZE_MB = "size_mb"
    """Stored model size, MB (1e6 bytes)."""
    ENERGY_MJ = "energy_mj"
    """Energy per decoded token, millijoules."""


@dataclass(frozen=True, kw_only=True)
class Target:
    kind: TargetKind
    value: float

    def describe(self) -> str:
        what = {"decode_ms": "decode ≤ {} ms/token", "size_mb": "size ≤ {} MB", "energy_mj": "energy ≤ {} mJ/token"}
        return what[self.kind.value].format(f"{self.value:g}")


UNITS = {
    TargetKind.DECODE_MS: (1e-3, 1e12, "ms/token"),
    TargetKind.SIZE_MB: (1e6, 8.0, "MB"),
    TargetKind.ENERGY_MJ: (1e-3, 1e12, "mJ/token"),
}
"""Per target: its unit in seconds, bytes or joules; the knapsack's whole units per second, byte or joule (picoseconds,
bits, picojoules: the allocator counts in whole units); the label."""


def _resource(row: OpRow, kind: TargetKind, profile: DeviceProfile) -> float:
    """What one op spends of the target's resource, in the target's base unit (seconds, bytes, joules)."""
    if kind == TargetKind.SIZE_MB:
        return row.stored_bytes
    est = estimate_op(row, profile)
    return est.decode_s if kind == TargetKind.DECODE_MS else est.decode_j


def auto(
    cfg: ModelConfig,
    plan: Plan,
    profile: DeviceProfile,
    target: Target,
    *,
    sensitivity: Sensitivity,
    bits: tuple[int, ...] = (2, 3, 4),
    context: int = 512,
    prefill: int = 512,
) -> WhatIf:
    """The plan meeting `target` at the least predicted ΔKL: every linear's width chosen among `bits`, every other op
    kept as in `plan`. An unreachable target is a PippinError that says the floor."""
    if target.value <= 0:
        raise PippinError(f"The target must be positive, got {target.value:g}.")
    linears = [n for n in plan.bits if is_linear(n)]
    bad = [b for b in bits if b not in allowed_bits(linears[0])]
    if bad:
        raise PippinError(f"Candidate widths {bad} are not widths a linear can take: {allowed_bits(linears[0])}.")
    base, unit, label = UNITS[target.kind]
    # Price every linear at every candidate width (one table per width), and everything else once.
    spend: dict[str, dict[int, int]] = {n: {} for n in linears}
    params: dict[str, int] = {}
    fixed = 0.0
    for i, b in enumerate(sorted(bits)):
        rows = ops_table(cfg, plan.with_bits(dict.fromkeys(linears, b), tied=cfg.tie_embeddings), context=context, prefill=prefill)
        for r in rows:
            if r.name in spend:
                spend[r.name][b] = math.ceil(_resource(r, target.kind, profile) * unit)  # up: the plan stays within
                params[r.name] = r.params
            elif i == 0:
                fixed += _resource(r, target.kind, profile) * unit
    budget = target.value * base * unit
    floor = fixed + sum(min(s.values()) for s in spend.values())
    if floor > budget:
        raise PippinError(
            f"{target.describe()} is out of reach on {profile.name}: with every linear at {min(bits)} bits the model needs "
            f"{floor / unit / base:.4g} {label} ({fixed / unit / base:.4g} of it outside the linears). Relax the target, or "
            f"change the other ops with --rule (e.g. the embedding)."
        )
    choices = []
    for n in linears:
        costs = {b: sensitivity.cost(n, b) for b in spend[n]}
        # Latency and energy need not grow with the width (a 3-bit layer runs on 4-bit nibbles under act8; a 2-bit
        # kernel may expand slower than a 4-bit one): a width that spends no less and predicts no better than another
        # is never worth taking, and dropping such widths leaves the knapsack's assumption (more bits: more spent,
        # less ΔKL) true.
        keep = [b for b in spend[n] if not any(_dominates(spend[n], costs, o, b) for o in spend[n] if o != b)]
        choices.append(LayerChoice(name=n, n_weights=params[n], sizes={b: spend[n][b] for b in keep}, costs={b: costs[b] for b in keep}))
    chosen = allocate(choices, budget_bits=budget, fixed_bits=fixed)
    return simulate(
        cfg, plan.with_bits(chosen, tied=cfg.tie_embeddings), profile, sensitivity=sensitivity, context=context, prefill=prefill
    )


def _dominates(spend: dict[int, int], costs: dict[int, float], a: int, b: int) -> bool:
    """Width a is at least as good as width b on both counts, and better on one (ties go to the wider one)."""
    if spend[a] > spend[b] or costs[a] > costs[b]:
        return False
    return spend[a] < spend[b] or costs[a] < costs[b] or a > b


def write_plan(path: str | Path, result: WhatIf, *, profile: DeviceProfile, model: str, target: Target | None = None) -> dict[str, Any]:
    """Write the plan (atomically) as `pippin compress --plan` reads it (see `plan_record`); returns the record."""
    record = plan_record(result, profile=profile, model=model, target=target)
    write_json_atomic(path, record)
    return record


def plan_record(result: WhatIf, *, profile: DeviceProfile, model: str, target: Target | None = None) -> dict[str, Any]:
    """The plan as `pippin compress --plan` reads it: {"plan": {layer: bits}, ...}, with a "talaria" header recording
    the device profile, the target, the predictions and the compress flags the plan assumes."""
    p = result.plan
    flags = [f"--group-size {p.group_size}"]
    embed = p.bits.get("embed_tokens")
    if embed in (4, 6, 8):
        flags.append(f"--embed-bits {embed}")
    switches = (("--act8", p.act8), ("--rotate", p.rotated), ("--kv8", p.kv_bits == 8), ("--no-row-scale", not p.row_scale))
    flags += [flag for flag, on in switches if on]
    if p.rotated and not p.rotated_inputs:
        flags.append("--no-rotate-down")
    dense = sorted(n for n, b in p.bits.items() if is_linear(n) and b in DENSE_BITS)  # compress leaves them fp32
    record = {
        "plan": p.compress_plan(),
        "talaria": {
            "model": model,
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "device_profile": profile.to_dict(),
            "target": None if target is None else {"kind": target.kind.value, "value": target.value},
            "context": result.estimate.context,
            "prefill": result.estimate.prefill_tokens,
            "predicted": result.summary(),
            "compress_flags": " ".join(flags),
            "embed_bits": embed,
            "kv_bits": p.kv_bits,
            "dense_linears": dense,
            "note": "Estimates from a roofline model of the device profile and a quality predictor; compress with these "
            "flags, then measure (pippin eval fidelity, benchmarks/runtime.py).",
        },
    }
    return record
