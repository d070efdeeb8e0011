"""Device profiles for Talaria's roofline: memory bandwidth, compute per precision, energy per byte and per op.

Profiles are editable JSON files shipped in pippin/talaria/devices/ (a laptop CPU, a phone NPU, a datacenter GPU, and
the template of this machine), each field's source or assumption written next to it. `load_profile(name or path)`
reads one; "this-machine" is measured once by `measure_device` (a large tensor copy for bandwidth, matmuls for
fp32/bf16/int8 throughput, a tiny call for per-op overhead, and pippin's LUT kernels for their weight-decode rate: a
few seconds) and cached under $PIPPIN_HOME/talaria/. A profile is a model of a device, not a measurement of pippin on it;
per-op latency on the real kernels is measured by pippin.talaria.profile, and a profile's optional `calibration`
(pippin.talaria.fit) fits the roofline to such measurements.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pippin.errors import PippinError
from pippin.io import write_json_atomic
from pippin.kernels import cpu_name
from pippin.model.checkpoint import pippin_home

DEVICES_DIR = Path(__file__).parent / "devices"
THIS_MACHINE = "this-machine"


@dataclass(kw_only=True)
class DeviceProfile:
    """What the roofline needs to know about a device, with where each number comes from."""

    name: str
    description: str = ""
    memory_bandwidth_gbs: float
    """Sustained (measured) or peak (spec sheet) DRAM bandwidth, GB/s (1e9 bytes)."""
    compute_tops: dict[str, float]
    """Peak dense throughput by precision ('fp32', 'fp16', 'bf16', 'int8'), 1e12 operations a second."""
    float_precision: str
    """The precision float ops run in on this device (a key of compute_tops)."""
    energy_pj_per_byte: float
    """Energy of moving one byte from DRAM, picojoules."""
    energy_pj_per_op: dict[str, float]
    """Energy of one arithmetic operation by precision, picojoules (a multiply-add is 2 ops)."""
    op_overhead_us: float
    """Fixed cost of each op: launch or dispatch latency, microseconds."""
    weight_decode_gws: dict[str, dict[str, float]] = field(default_factory=dict)
    """Compressed weights a batch-1 matrix-vector product expands a second, by compute ('int8', 'float') and stored
    bits ('2'...'8'), 1e9 weights/s; a third roof beside memory and compute. Empty where it is not modeled (the decode
    is assumed to hide under the memory stream)."""
    calibration: dict[str, Any] | None = None
    """Latency fitted to profiled plans of one model on this device (pippin.talaria.fit: per-width kernel rates,
    per-kind efficiencies, the engine's step over its ops, for decode and prefill); None: the plain roofline."""
    sources: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    measured: dict[str, Any] | None = None
    """For a measured profile: when, where and how."""

    def precision(self, compute: str) -> str:
        """The precision an op of compute kind 'int8' or 'float' runs in here."""
        return "int8" if compute == "int8" and "int8" in self.compute_tops else self.float_precision

    def decode_rate(self, compute: str, bits: int) -> float | None:
        """Weights/s the LUT decode sustains for this compute kind and width, or None (not modeled)."""
        rate = self.weight_decode_gws.get("int8" if compute == "int8" else "float", {}).get(str(bits))
        return rate * 1e9 if rate else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "profile") -> DeviceProfile:
        """Validate a profile read from JSON: known fields, positive numbers, a float precision it has figures for."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PippinError(f"{source}: unknown device profile fields {unknown}; known fields are {sorted(known)}.")
        try:
            profile = cls(**data)
        except TypeError as e:
            raise PippinError(f"{source}: not a complete device profile ({e}).") from None
        numbers = {"memory_bandwidth_gbs": profile.memory_bandwidth_gbs, "op_overhead_us": profile.op_overhead_us}
        numbers |= {"energy_pj_per_byte": profile.energy_pj_per_byte}
        numbers |= {f"compute_tops.{k}": v for k, v in (profile.compute_tops or {}).items()}
        numbers |= {f"energy_pj_per_op.{k}": v for k, v in (profile.energy_pj_per_op or {}).items()}
        for c, rates in profile.weight_decode_gws.items():
            numbers |= {f"weight_decode_gws.{c}.{b}": v for b, v in rates.items()}
        for key, v in numbers.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and key != "op_overhead_us"):
                raise PippinError(f"{source}: {key} must be a positive number, got {v!r}.")
        if profile.calibration is not None:
            _check_calibration(profile.calibration, source)
        if profile.float_precision not in profile.compute_tops:
            raise PippinError(f"{source}: float_precision {profile.float_precision!r} has no entry in compute_tops.")
        missing = sorted(set(profile.compute_tops) - set(profile.energy_pj_per_op))
        if missing:
            raise PippinError(f"{source}: energy_pj_per_op has no figure for {missing}.")
        return profile


def _check_calibration(cal: Any, source: str) -> None:
    """A calibration holds, per phase ('decode', 'prefill'), rates {kind: {compute: {bits: 1e9 weights/s}}}, efficiencies
    {op key: factor} and a step scale: every number finite and positive."""
    if not isinstance(cal, dict) or not all(isinstance(cal.get(p), dict) for p in ("decode", "prefill")):
        raise PippinError(f"{source}: calibration must hold 'decode' and 'prefill' objects (see pippin.talaria.fit).")
    for phase in ("decode", "prefill"):
        c = cal[phase]
        try:
            numbers = {f"{phase}.step_scale": c["step_scale"]}
            numbers |= {f"{phase}.efficiency.{k}": v for k, v in c["efficiency"].items()}
            for kind, by_compute in c["gws"].items():
                numbers |= {f"{phase}.gws.{kind}.{cp}.{b}": v for cp, rates in by_compute.items() for b, v in rates.items()}
        except (KeyError, AttributeError, TypeError):
            raise PippinError(f"{source}: calibration.{phase} needs 'gws', 'efficiency' and 'step_scale'.") from None
        for key, v in numbers.items():
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not v >= 0
                or v == float("inf")
                or (v == 0 and "overhead" not in key)
            ):
                raise PippinError(f"{source}: calibration {key} must be a positive number, got {v!r}.")


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.json"))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PippinError(f"Cannot read the device profile {path}: {e}.") from e
    if not isinstance(data, dict):
        raise PippinError(f"{path} must hold a JSON object (a device profile).")
    return data


def load_profile(name: str, *, measure: bool = True) -> DeviceProfile:
    """A shipped profile by name, a profile JSON file by path, or "this-machine" (measured once and cached; with
    measure=False a missing measurement is an error instead)."""
    path = Path(name).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PippinError(f"No device profile at {path}.")
        return DeviceProfile.from_dict(_read(path), source=str(path))
    if name == THIS_MACHINE:
        return this_machine_profile(measure=measure)
    if name not in list_profiles():
        raise PippinError(f"Unknown device profile {name!r}; choose one of {', '.join(list_profiles())}, or give a JSON file.")
    return DeviceProfile.from_dict(_read(DEVICES_DIR / f"{name}.json"), source=name)


def this_machine_cache() -> Path:
    return pippin_home() / "talaria" / f"{THIS_MACHINE}.json"


def _host() -> dict[str, Any]:
    return {"cpu": cpu_name(), "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def this_machine_profile(*, measure: bool = True, refresh: bool = False, **measure_kwargs: Any) -> DeviceProfile:
    """The cached measurement of this machine merged into the shipped template (whose energy figures are assumptions);
    measured and cached when missing, when the host changed (CPU, threads, torch), or on refresh."""
    cache = this_machine_cache()
    if cache.is_file() and not refresh:
        data = _read(cache)
        if (data.get("measured") or {}).get("host") == _host():
            return DeviceProfile.from_dict(data, source=str(cache))
    if not measure:
        raise PippinError(f"This machine is not measured yet (no {cache}); run `pippin talaria --measure`.")
    print("measuring this machine: memory bandwidth, matmul throughput, LUT kernels (a few seconds)", file=sys.stderr)
    template = _read(DEVICES_DIR / f"{THIS_MACHINE}.json")
    profile = DeviceProfile.from_dict({**template, **measure_device(**measure_kwargs)}, source="this machine")
    write_json_atomic(cache, profile.to_dict())
    return profile


def _median_s(fn: Any, *, repeats: int, sync: Any = None) -> float:
    """Median wall time of fn() over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def measure_device(
    *, device: str = "cpu", copy_mb: int = 512, matmul_n: int = 1024, repeats: int = 5, kernels: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """Measure a device's profile fields with torch: bandwidth from a copy of `copy_mb` MB (read + write counted),
    throughput from (n x n) @ (n x n) matmuls in fp32, bf16 and int8 (`torch._int_mm`), the per-op overhead from a
    (1 x 64) @ (64 x 64) call, and on a CPU with pippin's kernels their weight-decode rate per width. Medians of
    `repeats`; about 5 s at the defaults on an idle machine (a busy one gives low, noisy figures: CPU threads wait for
    each other). `threads` sets torch's CPU threads for the measurement. Tests call it with tiny sizes."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(torch.device(device), copy_mb=copy_mb, matmul_n=matmul_n, repeats=repeats, kernels=kernels)
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _measure(dev: torch.device, *, copy_mb: int, matmul_n: int, repeats: int, kernels: bool) -> dict[str, Any]:
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    bandwidth = _copy_gbs(dev, copy_mb=copy_mb, repeats=repeats, sync=sync)
    n = matmul_n
    tops: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) + ((("fp16", torch.float16),) if dev.type == "cuda" else ()):
        x = torch.randn(n, n, device=dev).to(dtype)
        tops[name] = 2 * n**3 / _median_s(lambda x=x: x @ x, repeats=repeats, sync=sync) / 1e12
    a = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=dev)
    tops["int8"] = 2 * n**3 / _median_s(lambda: torch._int_mm(a, a), repeats=repeats, sync=sync) / 1e12
    x, w = torch.randn(1, 64, device=dev), torch.randn(64, 64, device=dev)
    calls = 100
    overhead = _median_s(lambda: [x @ w for _ in range(calls)], repeats=repeats, sync=sync) / calls * 1e6
    decode = _decode_rates(repeats=repeats, k=min(1024, max(64, matmul_n))) if kernels and dev.type == "cpu" else {}
    how = (
        f"pippin.talaria.devices.measure_device: copy of {copy_mb} MB (read + write), {n} x {n} matmuls, "
        f"(1 x 64) @ (64 x 64) calls for the overhead, medians of {repeats}"
    )
    return {
        "memory_bandwidth_gbs": _sig(bandwidth),
        "compute_tops": {k: _sig(v) for k, v in tops.items()},
        "op_overhead_us": _sig(overhead),
        "weight_decode_gws": decode,
        "measured": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": _host(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
            "how": how,
        },
    }


def _copy_gbs(dev: torch.device, *, copy_mb: int, repeats: int, sync: Any) -> float:
    """GB/s of a large copy, bytes read plus bytes written."""
    n = copy_mb * 2**20 // 4
    src, dst = torch.ones(n, device=dev), torch.empty(n, device=dev)
    return 2 * n * 4 / _median_s(lambda: dst.copy_(src), repeats=repeats, sync=sync) / 1e9


def _decode_rates(*, repeats: int, k: int) -> dict[str, dict[str, float]]:
    """Weights/s of pippin's batch-1 LUT matrix-vector kernels on a cache-resident (2k x k) matrix, per width: with
    act8 (the integer kernels) and without (the float LUT kernel). Empty without the kernels."""
    from pippin.kernels import ops
    from pippin.quant.linear import PalettizedLinear
    from pippin.quant.pack import SUPPORTED_BITS

    if ops() is None:
        return {}
    rates: dict[str, dict[str, float]] = {"int8": {}, "float": {}}
    x = torch.randn(1, k)
    for bits in SUPPORTED_BITS:
        m = PalettizedLinear(k, 2 * k, bits=bits, group_size=16)
        m.packed.random_(0, 256)
        m.lut.copy_(torch.randn_like(m.lut.float()).sort(1).values.half())
        for compute, act8 in (("int8", True), ("float", False)):
            m.act8 = act8
            t = _median_s(lambda m=m: [m(x) for _ in range(10)], repeats=repeats) / 10
            rates[compute][str(bits)] = _sig(2 * k * k / t / 1e9)
    return rates
