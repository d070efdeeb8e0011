"""Talaria's measured side: the profiler fills every op's measured columns, the fit recovers known rates, errors are
scored as a hand computation says, `pippin talaria --profile` end to end. No assertion depends on how fast anything ran."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pippin.cli import main
from pippin.commands.talaria import engine_steps
from pippin.model.config import get_preset
from pippin.talaria.devices import DeviceProfile
from pippin.talaria.fit import errors, fit_latency
from pippin.talaria.ops import OpKind, ops_table
from pippin.talaria.plan import is_linear, plan_from_config, plan_from_model
from pippin.talaria.profile import Profile, Timing, build_model, profile_ops, with_measured
from pippin.talaria.quality import prior_sensitivity
from pippin.talaria.roofline import estimate
from pippin.talaria.source import open_model
from pippin.talaria.web import TalariaView
from pippin.talaria.whatif import Target, TargetKind, auto

MEASURED = ("measured_decode_s", "measured_decode_iqr_s", "measured_prefill_s", "measured_prefill_iqr_s", "measured_repeats")


def mixed_plan(cfg):
    """Every linear kind at a different width, an int8 embedding, act8."""
    widths = {"q_proj": 4, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 3, "up_proj": 2, "down_proj": 4}
    lin = {n: widths[n.rsplit(".", 1)[-1]] for n in plan_from_config(cfg).bits if is_linear(n)}
    return plan_from_config(cfg, lin, embed_bits=8, act8=True)


def test_build_model_is_stored_as_the_plan():
    cfg = get_preset("tiny")
    plan = mixed_plan(cfg)
    read = plan_from_model(build_model(cfg, plan))
    assert read.bits == plan.bits and read.act8 and read.group_size == plan.group_size
    lut = plan_from_config(cfg, plan.compress_plan(), embed_bits=4, act8=True)
    assert plan_from_model(build_model(cfg, lut)).bits["embed_tokens"] == 4


def test_profiler_fills_every_op_with_medians_and_spreads():
    cfg = get_preset("tiny")
    plan = mixed_plan(cfg)
    rows = ops_table(cfg, plan, context=64, prefill=32)
    prof = profile_ops(build_model(cfg, plan), rows, steps=engine_steps(), context=64, prefill=32, decode_repeats=5, prefill_repeats=3)
    filled = with_measured(rows, prof)
    # The same ops in the same order, every counted column untouched.
    assert [r.name for r in filled] == [r.name for r in rows]
    assert [dataclasses.replace(r, **dict.fromkeys(MEASURED)) for r in filled] == rows
    for r in filled:
        # Attention is a difference of two step times (no kernel of its own): never negative, possibly zero.
        floor = 0.0 if r.kind == OpKind.ATTENTION else 1e-9
        assert r.measured_decode_s >= floor and r.measured_prefill_s >= floor, r.name
        assert r.measured_decode_iqr_s >= 0 and r.measured_prefill_iqr_s >= 0 and r.measured_repeats == 3
    assert prof.fused  # the kernels ran the decode ops (a tiny model is plannable)
    assert prof.decode_step.repeats == 5 and prof.prefill_step.repeats == 3 and prof.decode_step.median_s > 0
    s = prof.summary()
    assert s["decode_op_sum_s"] == pytest.approx(sum(r.measured_decode_s for r in filled))
    # A table the profile did not measure is refused.
    with pytest.raises(Exception, match="no timing"):
        with_measured(ops_table(get_preset("tiny"), plan, context=64, prefill=32) + [dataclasses.replace(rows[0], name="x")], prof)


def test_timing_quartiles():
    t = Timing.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_s, t.q1_s, t.q3_s, t.iqr_s, t.repeats) == (3.0, 2.0, 4.0, 2.0, 5)


def test_errors_against_a_hand_computation():
    e = errors([1.1, 0.8, 2.0], [1.0, 1.0, 2.5])
    assert e.relative == pytest.approx([0.1, -0.2, -0.2])
    assert e.mae == pytest.approx(0.5 / 3) and e.max_abs == pytest.approx(0.2)
    with pytest.raises(Exception, match="as many"):
        errors([1.0], [1.0, 2.0])


def base_profile() -> DeviceProfile:
    return DeviceProfile.from_dict(
        {
            "name": "test",
            "memory_bandwidth_gbs": 10.0,
            "compute_tops": {"fp32": 0.1, "int8": 0.4},
            "float_precision": "fp32",
            "energy_pj_per_byte": 10.0,
            "energy_pj_per_op": {"fp32": 1.0, "int8": 0.25},
            "op_overhead_us": 2.0,
        }
    )


def synthetic(rows, *, rates, dispatch, scale, efficiency, prefill_rate, device):
    """A Profile whose times follow a known model: palettized decode ops take dispatch + weights / rate[bits], every
    other op dispatch + its plain roofline time x efficiency; the step is `scale` x the ops without any dispatch."""
    from pippin.talaria.roofline import op_time

    dec, pre = {}, {}
    for r in rows:
        plain_d, _ = op_time(r.decode_flops, r.decode_bytes, r.weights_decoded, r.bits, r.compute, device)
        plain_p, _ = op_time(r.prefill_flops, r.prefill_bytes, r.weights_decoded, r.bits, r.compute, device)
        if r.kind == OpKind.LINEAR:
            d = r.weights_decoded / (rates[r.bits] * 1e9)
            p = r.weights_decoded * r.prefill_flops / r.decode_flops / (prefill_rate * 1e9)
        else:
            d, p = plain_d * efficiency, plain_p * efficiency
        dec[r.name] = Timing.of([d + (0 if r.kind == OpKind.ATTENTION else dispatch)])
        pre[r.name] = Timing.of([p])
    step_d = (sum(t.median_s for t in dec.values()) - dispatch * sum(r.kind != OpKind.ATTENTION for r in rows)) * scale
    step_p = sum(t.median_s for t in pre.values()) * scale
    kw = {"context": 64, "prefill_tokens": 32, "fused": True, "threads": 1, "dispatch_s": dispatch}
    return Profile(**kw, decode=dec, prefill=pre, decode_step=Timing.of([step_d]), prefill_step=Timing.of([step_p]))


def test_fit_recovers_known_rates_and_prices_other_plans():
    cfg = get_preset("tiny")
    device = base_profile()
    truth = {"rates": {2: 3.0, 3: 1.0, 4: 2.0}, "dispatch": 2e-6, "scale": 0.8, "efficiency": 3.0, "prefill_rate": 50.0}
    fit_plan = mixed_plan(cfg)
    rows = ops_table(cfg, fit_plan, context=64, prefill=32)
    fitted = fit_latency(device, [(rows, synthetic(rows, device=device, **truth))])
    dec = fitted.calibration["decode"]
    assert dec["gws"]["linear"]["int8"] == {"2": pytest.approx(3.0), "3": pytest.approx(1.0), "4": pytest.approx(2.0)}
    assert dec["efficiency"]["norm/32"] == pytest.approx(3.0) and dec["step_scale"] == pytest.approx(0.8, rel=1e-3)
    assert fitted.calibration["prefill"]["gws"]["linear"]["int8"]["3"] == pytest.approx(50.0)
    # Another plan under the same model: the fitted roofline predicts its steps (the plain one does not).
    other = plan_from_config(cfg, dict.fromkeys(fit_plan.compress_plan(), 2), embed_bits=8, act8=True)
    other_rows = ops_table(cfg, other, context=64, prefill=32)
    want = synthetic(other_rows, device=device, **truth)
    got = estimate(other_rows, fitted, context=64, prefill=32)
    assert got.decode_s == pytest.approx(want.decode_step.median_s, rel=1e-3)
    assert got.prefill_s == pytest.approx(want.prefill_step.median_s, rel=1e-3)
    assert estimate(other_rows, device, context=64, prefill=32).decode_s != pytest.approx(want.decode_step.median_s, rel=0.1)
    # The fitted profile survives its JSON round trip and validation.
    assert DeviceProfile.from_dict(json.loads(json.dumps(fitted.to_dict()))).calibration == fitted.calibration


def test_auto_skips_widths_that_cost_more_latency_for_less_quality():
    """A 3-bit layer that runs slower than a 4-bit one (act8's nibbles) is never chosen for a latency target."""
    cfg = get_preset("tiny")
    device = base_profile()
    truth = {"rates": {2: 3.0, 3: 1.0, 4: 2.0}, "dispatch": 0.0, "scale": 1.0, "efficiency": 1.0, "prefill_rate": 50.0}
    rows = ops_table(cfg, mixed_plan(cfg), context=64, prefill=32)
    fitted = fit_latency(device, [(rows, synthetic(rows, device=device, **truth))])
    base = plan_from_config(cfg, embed_bits=8, act8=True)
    params = {r.name: r.params for r in ops_table(cfg, base, context=1, prefill=1)}
    sens = prior_sensitivity(base, params)
    kw = {"sensitivity": sens, "context": 64, "prefill": 32}
    lo = auto(cfg, base, fitted, Target(kind=TargetKind.DECODE_MS, value=1e3), bits=(2, 3, 4), **kw)
    assert set(lo.plan.compress_plan().values()) == {4}  # no limit: the best quality
    uni2 = estimate(
        ops_table(cfg, base.with_bits(dict.fromkeys(lo.plan.compress_plan(), 2)), context=64, prefill=32), fitted, context=64, prefill=32
    )
    target = (uni2.decode_s + lo.estimate.decode_s) / 2 * 1e3
    mid = auto(cfg, base, fitted, Target(kind=TargetKind.DECODE_MS, value=target), bits=(2, 3, 4), **kw)
    assert mid.estimate.decode_s * 1e3 <= target and 3 not in mid.plan.compress_plan().values()


def test_cli_profile_adds_measured_columns(capsys):
    common = ["talaria", "--model", "tiny", "--device-profile", "laptop-cpu", "--context", "32", "--prefill", "16", "--rule", "*_proj=4"]
    assert main([*common, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--act8", "--profile", "--repeats", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["rows"]] == [r["name"] for r in plain["rows"]]
    assert all(r["measured_decode_s"] is not None and r["measured_prefill_s"] is not None for r in data["rows"])
    m = data["measured"]
    assert m["repeats"] == {"decode": 2, "prefill": 2} and m["decode_step_s"] > 0
    assert m["decode_op_sum_s"] == pytest.approx(sum(r["measured_decode_s"] for r in data["rows"]))
    assert main([*common, "--profile", "--repeats", "2", "--group", "kind"]) == 0
    out = capsys.readouterr().out
    assert "meas. µs" in out and "engine decode step" in out and "per-op sum" in out


def test_web_view_shows_measurements_of_unedited_ops_only():
    src = open_model("tiny")
    plan = src.plan.with_bits(dict.fromkeys([n for n in src.plan.bits if is_linear(n)], 4))
    rows = ops_table(src.config, plan, context=32, prefill=16)
    measured = [dataclasses.replace(r, measured_decode_s=1e-6 * (i + 1), measured_prefill_s=1e-3) for i, r in enumerate(rows)]
    view = TalariaView(src, plan=plan, device="laptop-cpu", context=32, prefill=16, measured=measured)
    answer = {r["name"]: r for r in view.price({"layers.0.mlp.down_proj": 2}, [])["rows"]}
    assert answer["layers.0.mlp.down_proj"]["measured_decode_s"] is None  # edited: its measurement no longer applies
    assert answer["layers.0.mlp.up_proj"]["measured_decode_s"] == pytest.approx(
        measured[[r.name for r in rows].index("layers.0.mlp.up_proj")].measured_decode_s
    )
    assert answer["layers.0.self_attn.attention"]["measured_prefill_s"] == pytest.approx(1e-3)
