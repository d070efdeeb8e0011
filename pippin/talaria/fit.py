"""Fit a device profile's latency to profiled plans, and score predictions against measurements.

The plain roofline prices each op from micro-benchmarks (bandwidth, GEMM peaks, cache-resident LUT kernels) and misses
what a real step does: LUT matvecs streaming their weights from DRAM, pippin's act8 GEMM running below torch's int8
peak, Python's embedding lookup, attention reading the cache below the copy bandwidth, the step's own overheads.
`fit_latency(profile, runs)` fits, from profiled plans (`pippin.talaria.profile`; never the plans it is scored on):
- per op kind (linear, head), compute (int8, float) and width: the rate its kernel reached (weights x rows a second);
- for every other op, by kind and width: measured time over the plain roofline's (an efficiency factor);
- per phase, a step scale: the engine's measured step over the sum of the fitted ops (multiplies every op).
Decode ops on the fused kernels are timed one call at a time, each paying Python's dispatch, which the fused step does
not: their fitted time leaves out the profile's measured dispatch (`Profile.dispatch_s`). `errors` scores predictions.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from pippin.errors import PippinError
from pippin.talaria.devices import DeviceProfile
from pippin.talaria.ops import OpKind, OpRow
from pippin.talaria.profile import Profile
from pippin.talaria.roofline import op_key, op_time

RATE_KINDS = (OpKind.LINEAR, OpKind.HEAD)
"""Ops priced by a fitted kernel rate (when palettized or int8); every other op by an efficiency factor."""


def _phase_fit(runs: list[tuple[list[OpRow], Profile]], phase: str, base: DeviceProfile) -> dict[str, Any]:
    """One phase's rates, efficiencies and step scale."""
    work: dict[tuple[str, str, str], list[float]] = {}  # (kind, compute, bits) -> [weights x rows, seconds]
    eff: dict[str, list[float]] = {}  # op key -> [plain roofline seconds, measured seconds]
    per_run: list[tuple[float, list[tuple[OpRow, float]]]] = []
    for rows, prof in runs:
        timings = prof.decode if phase == "decode" else prof.prefill
        dispatch = prof.dispatch_s if phase == "decode" and prof.fused else 0.0
        step = (prof.decode_step if phase == "decode" else prof.prefill_step).median_s
        measured = []
        for r in rows:
            # Attention's decode time is a difference of two whole steps: no dispatch of its own.
            t = timings[r.name].median_s - (0.0 if r.kind == OpKind.ATTENTION else dispatch)
            t = max(t, 1e-9)
            measured.append((r, t))
            flops = r.decode_flops if phase == "decode" else r.prefill_flops
            if r.kind in RATE_KINDS and r.weights_decoded:
                w = work.setdefault((r.kind.value, r.compute, str(r.bits)), [0.0, 0.0])
                w[0] += r.weights_decoded * flops / max(r.decode_flops, 1.0)
                w[1] += t
            else:
                n_bytes = r.decode_bytes if phase == "decode" else r.prefill_bytes
                plain, _ = op_time(flops, n_bytes, r.weights_decoded, r.bits, r.compute, base)
                e = eff.setdefault(op_key(r), [0.0, 0.0])
                e[0] += plain
                e[1] += t
        per_run.append((step, measured))
    gws: dict[str, dict[str, dict[str, float]]] = {}
    for (kind, compute, bits), (w, t) in sorted(work.items()):
        gws.setdefault(kind, {}).setdefault(compute, {})[bits] = _sig(w / t / 1e9)
    efficiency = {k: _sig(t / p) for k, (p, t) in sorted(eff.items()) if p > 0}

    def fitted(r: OpRow, t: float) -> float:
        """The op's time as the fitted tables give it back (pooled over the runs, so not exactly its own)."""
        flops = r.decode_flops if phase == "decode" else r.prefill_flops
        rate = gws.get(r.kind.value, {}).get(r.compute, {}).get(str(r.bits)) if r.weights_decoded else None
        if r.kind in RATE_KINDS and rate:
            return r.weights_decoded * flops / max(r.decode_flops, 1.0) / (rate * 1e9)
        n_bytes = r.decode_bytes if phase == "decode" else r.prefill_bytes
        plain, _ = op_time(flops, n_bytes, r.weights_decoded, r.bits, r.compute, base)
        return plain * efficiency.get(op_key(r), 1.0)

    # The engine's step over the sum of the fitted ops: Python's dispatch between ops in the prefill, the fused
    # step's gain over ops run one by one in the decode, what the step does beside its ops.
    scale = sum(step for step, _ in per_run) / sum(fitted(r, t) for _, measured in per_run for r, t in measured)
    return {"gws": gws, "efficiency": efficiency, "step_scale": _sig(scale)}


def fit_latency(profile: DeviceProfile, runs: list[tuple[list[OpRow], Profile]], *, note: str = "") -> DeviceProfile:
    """A copy of `profile` with a latency calibration fitted to `runs` (each an ops table and its measured profile, of
    one model at one context and prefill length). Score it on other plans: on its own it is right by construction."""
    if not runs:
        raise PippinError("Fit the latency model to at least one profiled plan.")
    shapes = {(p.context, p.prefill_tokens) for _, p in runs}
    if len(shapes) > 1:
        raise PippinError(f"The profiled plans were measured at different context / prefill lengths {sorted(shapes)}; use one.")
    for rows, prof in runs:
        missing = [r.name for r in rows if r.name not in prof.decode or r.name not in prof.prefill]
        if missing:
            raise PippinError(f"A profile has no timing for {missing[:3]}: fit on tables of the profiled models.")
    calibration = {
        "decode": _phase_fit(runs, "decode", profile),
        "prefill": _phase_fit(runs, "prefill", profile),
        "context": runs[0][1].context,
        "prefill_tokens": runs[0][1].prefill_tokens,
        "n_plans": len(runs),
        "note": note,
    }
    data = {**profile.to_dict(), "calibration": calibration}
    data["name"] = f"{profile.name}+fit"
    return DeviceProfile.from_dict(data, source="fitted profile")


@dataclass(kw_only=True)
class Errors:
    """Predicted against measured seconds over plans: each plan's relative error and their mean absolute value."""

    relative: list[float]
    """(predicted - measured) / measured, per plan."""
    mae: float
    """Mean of |relative|: the mean absolute percentage error, as a fraction."""
    max_abs: float


def errors(predicted: list[float], measured: list[float]) -> Errors:
    """Relative errors of predicted against measured latencies (seconds), plan by plan."""
    if len(predicted) != len(measured) or not measured:
        raise PippinError(f"Score as many predictions as measurements (got {len(predicted)} and {len(measured)}), at least one.")
    if any(m <= 0 for m in measured):
        raise PippinError("Measured latencies must be positive.")
    rel = [(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return Errors(relative=rel, mae=statistics.fmean(abs(r) for r in rel), max_abs=max(abs(r) for r in rel))


def _sig(x: float) -> float:
    return float(f"{x:.4g}")
