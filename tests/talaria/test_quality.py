"""The quality predictor: priors, stored and weight-derived sensitivities, and calibration against measured KL."""

from __future__ import annotations

import dataclasses
import random

import pytest

from pippin.errors import PippinError
from pippin.io import write_json_atomic
from pippin.model.config import get_preset
from pippin.quant.calibrate import calibration_batches, input_moments
from pippin.quant.compress import SENSITIVITY_FILE, CompressConfig, sensitivity_record
from pippin.talaria.ops import ops_table
from pippin.talaria.plan import is_linear, plan_from_config
from pippin.talaria.quality import (
    PRIOR_ACT8_KL,
    Sensitivity,
    calibrate_predictor,
    load_sensitivity,
    prior_sensitivity,
    relative_mse,
    sensitivity_from_weights,
)
from tests.conftest import tiny_model
from tests.talaria.conftest import CALIB


def params_of(cfg, plan):
    return {r.name: r.params for r in ops_table(cfg, plan, context=1, prefill=1)}


def random_plans(cfg, n, *, seed=0, act8=False):
    rng = random.Random(seed)
    base = plan_from_config(cfg, embed_bits=8, act8=act8)
    return [base.with_bits({k: rng.choice((2, 3, 4, 6)) for k in base.bits if is_linear(k)}) for _ in range(n)]


def test_the_prior_falls_with_bits_and_counts_each_weight_once():
    assert relative_mse(2) == pytest.approx(0.1175) and relative_mse(16) == relative_mse(32) == 0
    assert relative_mse(2) > relative_mse(3) > relative_mse(4) > relative_mse(6) > relative_mse(8) > 0
    cfg = get_preset("tiny")
    plan = plan_from_config(cfg, {"layers.0.mlp.up_proj": 2})
    sens = prior_sensitivity(plan, params_of(cfg, plan))
    kl = sens.op_kl(plan)
    assert set(k for k, v in kl.items() if v > 0) == {"layers.0.mlp.up_proj"}  # dense ops are lossless
    total = sum(cfg.param_counts().values())
    assert kl["layers.0.mlp.up_proj"] == pytest.approx(sens.scale * 128 * 64 / total * 0.1175)
    assert sens.predict(plan) == pytest.approx(kl["layers.0.mlp.up_proj"])  # no act8 term without act8
    assert sens.predict(dataclasses.replace(plan, act8=True)) == pytest.approx(sens.predict(plan) + PRIOR_ACT8_KL)


def test_calibration_recovers_a_known_scale_and_act8_term():
    cfg = get_preset("tiny")
    plans = random_plans(cfg, 6)
    sens = prior_sensitivity(plans[0], params_of(cfg, plans[0]))
    raw = [sens.predict(p) / sens.scale for p in plans]
    cal = calibrate_predictor([(p, 3.7 * c) for p, c in zip(plans, raw)], sensitivity=sens)
    assert cal.scale == pytest.approx(3.7) and cal.act8_kl == 0 and cal.mean_rel_error < 1e-9 and cal.loo_mean_rel_error < 1e-9
    # Plans with 8-bit activations carry a constant the op costs do not: fitted from a mix of plans.
    mixed = random_plans(cfg, 4, seed=1) + random_plans(cfg, 4, seed=2, act8=True)
    measured = [(p, 2.0 * sum(sens.cost(n, b) for n, b in p.bits.items()) + (0.05 if p.act8 else 0.0)) for p in mixed]
    cal = calibrate_predictor(measured, sensitivity=sens)
    assert cal.scale == pytest.approx(2.0) and cal.act8_kl == pytest.approx(0.05)
    calibrated = sens.calibrated(measured)
    assert calibrated.predict(mixed[5]) == pytest.approx(measured[5][1])
    # Noise: the error is reported, leave-one-out above the in-sample error.
    rng = random.Random(3)
    noisy = [(p, kl * rng.uniform(0.7, 1.3)) for p, kl in measured]
    cal = calibrate_predictor(noisy, sensitivity=sens)
    assert 0.01 < cal.mean_rel_error < 0.3 and cal.loo_mean_rel_error > cal.mean_rel_error
    assert cal.scale == pytest.approx(2.0, rel=0.3)
    with pytest.raises(PippinError, match="positive measured KL"):
        calibrate_predictor([(plans[0], 0.0)], sensitivity=sens)


def test_weight_sensitivities_rank_widths_and_respect_activation_moments():
    model = tiny_model()
    costs = sensitivity_from_weights(model, bits=(2, 3, 4))
    assert len(costs) == 14 and all(c[2] > c[3] > c[4] > 0 for c in costs.values())
    names = list(costs)
    moments = input_moments(model, calibration_batches(CALIB, seq_len=64, n_seqs=2), names)
    weighted = sensitivity_from_weights(model, bits=(2,), moments=moments)
    # With unit moments the two agree; real moments reweight the input channels.
    ones = sensitivity_from_weights(model, bits=(2,), moments={n: m * 0 + 1 for n, m in moments.items()})
    assert ones[names[0]][2] == pytest.approx(costs[names[0]][2], rel=1e-5)
    assert weighted[names[0]][2] != pytest.approx(costs[names[0]][2], rel=1e-2)


def test_stored_sensitivities_are_read_back_with_the_prior_for_what_they_lack(tmp_path, tiny_compressed):
    _, report = tiny_compressed
    assert set(report.costs) == set(report.plan) and all(set(c) == {2, 3, 4} for c in report.costs.values())
    write_json_atomic(tmp_path / SENSITIVITY_FILE, sensitivity_record(report, CompressConfig()))
    cfg = get_preset("tiny")
    plan = plan_from_config(cfg, report.plan, embed_bits=8)
    params = params_of(cfg, plan)
    sens = load_sensitivity(tmp_path, plan=plan, params=params)
    name = next(iter(report.costs))
    assert sens.costs[name] == pytest.approx(report.costs[name]) and sens.source.startswith("stored")
    # The embedding is not in the allocator's table: the prior's cost, in the table's units.
    prior = prior_sensitivity(plan, params)
    assert sens.scale * sens.cost("embed_tokens", 8) == pytest.approx(prior.scale * prior.cost("embed_tokens", 8))
    # Widths the table lacks follow the prior's curve from the nearest width it has.
    assert sens.cost(name, 6) == pytest.approx(report.costs[name][4] * relative_mse(6) / relative_mse(4))
    assert load_sensitivity(tmp_path / "none", plan=plan, params=params) is None
    (tmp_path / SENSITIVITY_FILE).write_text("{}")
    with pytest.raises(PippinError, match="not a sensitivity table"):
        load_sensitivity(tmp_path, plan=plan, params=params)


def test_sensitivity_costs_nothing_for_dense_or_unknown_ops():
    sens = Sensitivity(costs={"a": {2: 1.0}}, source="t", scale=2.0)
    assert sens.cost("a", 32) == 0 and sens.cost("b", 2) == 0 and sens.cost("a", 2) == 1.0
