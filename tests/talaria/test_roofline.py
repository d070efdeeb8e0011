"""Roofline estimates pick the right bound and add up; device profiles load, validate and measure."""

from __future__ import annotations

import json

import pytest

from pippin.errors import PippinError
from pippin.model.config import get_preset
from pippin.talaria import devices
from pippin.talaria.devices import DeviceProfile, list_profiles, load_profile, measure_device, this_machine_profile
from pippin.talaria.ops import ops_table
from pippin.talaria.plan import plan_from_config
from pippin.talaria.roofline import estimate, estimate_op
from pippin.talaria.whatif import Rule, apply_rules


def profile(**kw) -> DeviceProfile:
    base = {
        "name": "test",
        "memory_bandwidth_gbs": 1.0,
        "compute_tops": {"fp32": 1.0, "int8": 4.0},
        "float_precision": "fp32",
        "energy_pj_per_byte": 10.0,
        "energy_pj_per_op": {"fp32": 1.0, "int8": 0.25},
        "op_overhead_us": 3.0,
    }
    return DeviceProfile.from_dict(base | kw)


def test_each_op_takes_the_larger_of_memory_and_compute_time_plus_overhead():
    cfg = get_preset("tiny")
    rows = {r.name: r for r in ops_table(cfg, context=64, prefill=256)}
    q = rows["layers.0.self_attn.q_proj"]
    slow_memory = estimate_op(q, profile())  # 1 GB/s against 1 TFLOP/s: a batch-1 GEMV is memory-bound
    assert slow_memory.decode_bound == "memory"
    assert slow_memory.decode_s == pytest.approx(q.decode_bytes / 1e9 + 3e-6)
    assert slow_memory.decode_j == pytest.approx((q.decode_bytes * 10 + q.decode_flops * 1.0) * 1e-12)
    slow_compute = estimate_op(q, profile(memory_bandwidth_gbs=1e6, compute_tops={"fp32": 1e-6, "int8": 1e-6}))
    assert slow_compute.decode_bound == "compute"
    assert slow_compute.decode_s == pytest.approx(q.decode_flops / 1e6 + 3e-6)
    # Ridge at 10 FLOP/byte: decode does 0.5 FLOP per byte moved (weights once), a 256-token prefill 14 (activations
    # dominate this tiny matrix's traffic).
    assert q.decode_flops / q.decode_bytes < 10 < q.prefill_flops / q.prefill_bytes
    ridge = estimate_op(q, profile(memory_bandwidth_gbs=100.0))
    assert (ridge.decode_bound, ridge.prefill_bound) == ("memory", "compute")
    assert ridge.prefill_s == pytest.approx(q.prefill_flops / 1e12 + 3e-6)


def test_lut_decode_rate_is_a_third_roof_and_int8_ops_use_int8_figures():
    cfg = get_preset("tiny")
    plan = plan_from_config(cfg, {"layers.0.mlp.up_proj": 4}, act8=True)
    up = {r.name: r for r in ops_table(cfg, plan, context=8, prefill=8)}["layers.0.mlp.up_proj"]
    fast = profile(memory_bandwidth_gbs=1e6)
    assert estimate_op(up, fast).decode_s == pytest.approx(up.decode_flops / 4e12 + 3e-6)  # int8 throughput
    assert estimate_op(up, fast).decode_j == pytest.approx((up.decode_bytes * 10 + up.decode_flops * 0.25) * 1e-12)
    slow_lut = profile(memory_bandwidth_gbs=1e6, weight_decode_gws={"int8": {"4": 1e-3}})
    e = estimate_op(up, slow_lut)
    assert e.decode_bound == "decode" and e.decode_s == pytest.approx(up.weights_decoded / 1e6 + 3e-6)


def test_totals_add_up_the_ops():
    cfg = get_preset("tiny")
    rows = ops_table(cfg, context=32, prefill=64)
    p = profile()
    est = estimate(rows, p, context=32, prefill=64)
    assert est.decode_s == pytest.approx(sum(estimate_op(r, p).decode_s for r in rows))
    assert est.decode_tok_s == pytest.approx(1 / est.decode_s)
    assert est.prefill_tok_s == pytest.approx(64 / sum(estimate_op(r, p).prefill_s for r in rows))
    assert est.size_bytes == sum(r.stored_bytes for r in rows) and est.bpw == 32
    assert sum(est.decode_time_by_bound.values()) == pytest.approx(1.0)
    assert est.decode_time_by_bound["overhead"] == pytest.approx(len(rows) * 3e-6 / est.decode_s)


@pytest.mark.parametrize("name", [n for n in list_profiles() if n != "this-machine"])
def test_shipped_profiles_load_and_cite_their_sources(name):
    p = load_profile(name)
    assert p.sources and p.assumptions and p.memory_bandwidth_gbs > 0
    assert p.float_precision in p.compute_tops


def test_phone_npu_profile_lands_near_apples_afm_decode_rate():
    """AFM-on-device on iPhone 15 Pro: ~30 tok/s at 3.7 bpw (Apple, 2024). Mixed 2/4-bit linears at 3.7 bpw (15 % of
    the weights at 2 bits: the first 16 layers' MLP gate projections), 8-bit embedding, fp16 activations and KV."""
    cfg = get_preset("afm-on-device")
    plan = plan_from_config(cfg, dense_bits=16, embed_bits=8, kv_bits=16, act_bits=16, act8=True)
    plan = apply_rules(plan, [Rule(pattern="*_proj", bits=4), Rule(pattern="layers.[0-9].mlp.gate_proj", bits=2)])
    plan = apply_rules(plan, [Rule(pattern="layers.1[0-5].mlp.gate_proj", bits=2)])
    rows = ops_table(cfg, plan, context=256, prefill=512)
    est = estimate(rows, load_profile("phone-npu"), context=256, prefill=512)
    lin = [r for r in rows if r.name.endswith("_proj")]
    assert sum(r.params * r.bits for r in lin) / sum(r.params for r in lin) == pytest.approx(3.7, abs=0.05)
    assert 0.7 <= est.decode_tok_s / 30 <= 1.5


@pytest.mark.parametrize(
    "change,message",
    [
        ({"memory_bandwidth_gbs": -1}, "must be a positive number"),
        ({"float_precision": "fp16"}, "no entry in compute_tops"),
        ({"energy_pj_per_op": {"fp32": 1.0}}, "no figure for"),
        ({"colour": "red"}, "unknown device profile fields"),
    ],
)
def test_bad_profiles_are_refused(change, message):
    with pytest.raises(PippinError, match=message):
        profile(**change)


def test_profile_files_by_path_and_unknown_names(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(profile(name="mine").to_dict()))
    assert load_profile(str(f)).name == "mine"
    with pytest.raises(PippinError, match="Unknown device profile"):
        load_profile("toaster")


def test_measurement_fills_a_valid_profile_and_is_cached(tmp_path, monkeypatch):
    m = measure_device(copy_mb=1, matmul_n=64, repeats=1, kernels=True, threads=1)
    assert m["memory_bandwidth_gbs"] > 0 and m["op_overhead_us"] > 0
    assert set(m["compute_tops"]) == {"fp32", "bf16", "int8"}
    from pippin.kernels import ops

    if ops() is not None:
        assert set(m["weight_decode_gws"]["int8"]) == {"2", "3", "4", "6", "8"}
    monkeypatch.setenv("PIPPIN_HOME", str(tmp_path))
    calls = []

    def fake_measure(**kw):
        calls.append(kw)
        return m

    m["measured"]["host"] = devices._host()  # measured with 1 thread (busy test machines), cached for this process
    monkeypatch.setattr(devices, "measure_device", fake_measure)
    with pytest.raises(PippinError, match="not measured yet"):
        this_machine_profile(measure=False)
    first = this_machine_profile()
    assert first.memory_bandwidth_gbs == m["memory_bandwidth_gbs"] and first.energy_pj_per_byte > 0  # the template's
    assert load_profile("this-machine").to_dict() == first.to_dict() and len(calls) == 1  # from the cache
    this_machine_profile(refresh=True)
    assert len(calls) == 2
