"""Roofline estimates of each op's latency and energy on a device profile, and the totals a person decides on.

An op takes max(bytes / bandwidth, FLOPs / compute, compressed weights / LUT-decode rate) plus the device's fixed
per-op overhead, and costs bytes * energy-per-byte + FLOPs * energy-per-op. Decode is one step at batch 1 and
context L; prefill one chunk of N tokens. Totals: model size, decode latency (tok/s), prefill tok/s, energy per token.
These are estimates from a model of the device (Williams et al., "Roofline", CACM 2009), not measurements: they ignore
caches, overlap between ops and static power. A profile with a `calibration` (pippin.talaria.fit: fitted to profiled
plans of the same model) prices each palettized op at its fitted kernel rate instead, scales the other ops by their
kind's fitted efficiency, and scales both by the engine's step over its ops (fitted too); ops it has no figure for
keep the plain roofline's time, scaled alike. Measured per-op latency comes from pippin.talaria.profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pippin.talaria.devices import DeviceProfile
from pippin.talaria.ops import OpRow, totals

BOUNDS = ("memory", "compute", "decode")
"""What limits an op: bytes moved, arithmetic, or expanding compressed weights."""


@dataclass(kw_only=True)
class OpEstimate:
    name: str
    decode_s: float
    decode_bound: str
    decode_j: float
    prefill_s: float
    """The whole chunk."""
    prefill_bound: str
    prefill_j: float


@dataclass(kw_only=True)
class Estimate:
    """A model stored as one plan, on one device: per-op estimates and the totals."""

    device: str
    context: int
    prefill_tokens: int
    n_params: int
    size_bytes: int
    bpw: float
    decode_s: float
    """Seconds per generated token (batch 1, at the context length)."""
    decode_tok_s: float
    decode_j: float
    """Joules per generated token."""
    prefill_s: float
    """Seconds for the prefill chunk."""
    prefill_tok_s: float
    prefill_j_per_token: float
    decode_time_by_bound: dict[str, float] = field(default_factory=dict)
    """Share of decode time in ops of each bound, and in per-op overheads ('overhead')."""
    ops: list[OpEstimate] = field(default_factory=list)

    def summary(self) -> dict:
        """The totals without the per-op list (for a plan's header and JSON output)."""
        return {k: v for k, v in asdict(self).items() if k != "ops"}


def op_time(flops: float, n_bytes: float, weights: int, bits: int | None, compute: str, profile: DeviceProfile) -> tuple[float, str]:
    """(seconds, bound) of one op without its overhead."""
    times = {
        "memory": n_bytes / (profile.memory_bandwidth_gbs * 1e9),
        "compute": flops / (profile.compute_tops[profile.precision(compute)] * 1e12),
        "decode": 0.0,
    }
    rate = profile.decode_rate(compute, bits) if weights and bits is not None else None
    if rate:
        times["decode"] = weights / rate
    bound = max(BOUNDS, key=lambda b: times[b])
    return times[bound], bound


def op_energy(flops: float, n_bytes: float, compute: str, profile: DeviceProfile) -> float:
    """Joules: bytes moved from DRAM and arithmetic, nothing static."""
    return (n_bytes * profile.energy_pj_per_byte + flops * profile.energy_pj_per_op[profile.precision(compute)]) * 1e-12


def op_key(row: OpRow) -> str:
    """How a calibration names an op's efficiency: its kind, and its width where it has one ('embedding/8', 'norm/32')."""
    return row.kind.value if row.bits is None else f"{row.kind.value}/{row.bits}"


def _calibrated(row: OpRow, phase: str, plain: float, profile: DeviceProfile) -> tuple[float, float] | None:
    """(seconds, overhead) of an op from the profile's calibration for 'decode' or 'prefill' (its share of the step
    included: no separate overhead), or None without one."""
    cal = profile.calibration
    if cal is None:
        return None
    c = cal[phase]
    flops = row.decode_flops if phase == "decode" else row.prefill_flops
    rate = c["gws"].get(row.kind.value, {}).get(row.compute, {}).get(str(row.bits)) if row.weights_decoded else None
    if rate:  # weights x rows at the fitted rate; rows = FLOPs / (2 n k)
        rows = flops / max(row.decode_flops, 1.0)
        return row.weights_decoded * rows / (rate * 1e9) * c["step_scale"], 0.0
    return plain * c["efficiency"].get(op_key(row), 1.0) * c["step_scale"], 0.0


def estimate_op(row: OpRow, profile: DeviceProfile) -> OpEstimate:
    overhead = profile.op_overhead_us * 1e-6
    d_s, d_bound = op_time(row.decode_flops, row.decode_bytes, row.weights_decoded, row.bits, row.compute, profile)
    p_s, p_bound = op_time(row.prefill_flops, row.prefill_bytes, row.weights_decoded, row.bits, row.compute, profile)
    d_over = p_over = overhead
    if (fit := _calibrated(row, "decode", d_s, profile)) is not None:
        d_s, d_over = fit
    if (fit := _calibrated(row, "prefill", p_s, profile)) is not None:
        p_s, p_over = fit
    return OpEstimate(
        name=row.name,
        decode_s=d_s + d_over,
        decode_bound=d_bound,
        decode_j=op_energy(row.decode_flops, row.decode_bytes, row.compute, profile),
        prefill_s=p_s + p_over,
        prefill_bound=p_bound,
        prefill_j=op_energy(row.prefill_flops, row.prefill_bytes, row.compute, profile),
    )


def estimate(rows: list[OpRow], profile: DeviceProfile, *, context: int, prefill: int) -> Estimate:
    """Per-op roofline estimates of a table (built with the same context and prefill) and their totals."""
    ops = [estimate_op(r, profile) for r in rows]
    t = totals(rows)
    decode_s = sum(o.decode_s for o in ops)
    prefill_s = sum(o.prefill_s for o in ops)
    cal = profile.calibration
    overhead = 0.0 if cal else profile.op_overhead_us * 1e-6
    shares = {b: sum(o.decode_s - overhead for o in ops if o.decode_bound == b) / decode_s for b in BOUNDS}
    shares["overhead"] = overhead * len(ops) / decode_s
    return Estimate(
        device=profile.name,
        context=context,
        prefill_tokens=prefill,
        n_params=t.n_params,
        size_bytes=t.stored_bytes,
        bpw=t.bpw,
        decode_s=decode_s,
        decode_tok_s=1.0 / decode_s,
        decode_j=sum(o.decode_j for o in ops),
        prefill_s=prefill_s,
        prefill_tok_s=prefill / prefill_s,
        prefill_j_per_token=sum(o.prefill_j for o in ops) / prefill,
        decode_time_by_bound=shares,
        ops=ops,
    )
