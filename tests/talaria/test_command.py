"""`pippin talaria` end to end: a tiny model folder, the SmolLM2-135M preset without weights, auto plans, calibration."""

from __future__ import annotations

import json

import pytest

from pippin.cli import main
from pippin.io import write_json_atomic
from pippin.model.checkpoint import LoadedModel, save_pippin
from pippin.model.config import get_preset
from pippin.quant.compress import CompressConfig, load_plan, quantization_meta, validate_plan
from pippin.talaria import devices
from tests.conftest import tiny_model
from tests.serve.conftest import make_tiny_folder
from tests.talaria.conftest import compressed_tiny


def talaria(capsys, *args):
    code = main(["talaria", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_folder_table_and_totals(tmp_path, capsys):
    folder = make_tiny_folder(tmp_path / "tiny")
    code, out, _ = talaria(capsys, "--model", str(folder), "--device-profile", "laptop-cpu", "--json", "--context", "32")
    assert code == 0
    data = json.loads(out)
    assert len(data["rows"]) == 25 and data["rows"][0]["name"] == "embed_tokens" and data["rows"][-1]["name"] == "lm_head"
    n = sum(get_preset("tiny").param_counts().values())
    t = data["totals"]
    assert (t["n_params"], t["size_bytes"], t["context"]) == (n, 4 * n, 32)
    assert t["decode_s"] == pytest.approx(sum(r["decode_s"] for r in data["rows"]))
    assert t["predicted_kl"] == 0  # full precision
    code, out, _ = talaria(capsys, "--model", str(folder), "--device-profile", "laptop-cpu", "--sort", "decode", "--limit", "3", "--json")
    top = json.loads(out)["rows"]
    assert len(top) == 3 and top[0]["decode_s"] >= top[1]["decode_s"] >= top[2]["decode_s"]
    assert top[2]["decode_s"] >= max(r["decode_s"] for r in data["rows"] if r["name"] not in {x["name"] for x in top})
    code, out, _ = talaria(capsys, "--model", str(folder), "--device-profile", "laptop-cpu", "--context", "32")
    assert code == 0 and "decode: " in out and "tok/s" in out and "not measurements" in out
    assert sum(line.startswith(("layers.", "embed_tokens", "norm", "lm_head")) for line in out.splitlines()) == 25


def test_smollm2_preset_with_rules_without_weights(capsys):
    code, out, _ = talaria(
        capsys, "--model", "smollm2-135m", "--device-profile", "phone-npu", "--rule", "*_proj=4", "--rule", "embed_tokens=8",
        "--act8", "--group", "kind", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert {r["name"] for r in data["rows"]} == {"embedding", "norm", "linear", "attention", "activation", "head"}
    t = data["totals"]
    assert t["n_params"] == 134_515_008
    linear = next(r for r in data["rows"] if r["name"] == "linear")
    assert linear["params"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) and linear["bits"] == 4
    rows = 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)  # output rows of every linear
    # 4-bit indices, a 16-entry fp16 LUT per 16 rows, an fp16 scale per row
    assert linear["stored_bytes"] == linear["params"] // 2 + rows // 16 * 16 * 2 + rows * 2
    assert t["size_bytes"] == linear["stored_bytes"] + (49152 * 576 + 49152 * 4) + (61 * 576) * 4
    assert 0 < t["predicted_kl"] < 1 and t["decode_tok_s"] > 0


def test_auto_target_writes_a_plan_compress_accepts(tmp_path, capsys):
    folder = make_tiny_folder(tmp_path / "tiny")
    out_plan = tmp_path / "auto.json"
    code, out, _ = talaria(
        capsys, "--model", str(folder), "--device-profile", "laptop-cpu", "--rule", "embed_tokens=8", "--act8",
        "--target-size-mb", "0.047", "--write-plan", str(out_plan), "--context", "64", "--prefill", "64",
    )  # fmt: skip
    assert code == 0 and f"wrote {out_plan}" in out and "auto: size ≤ 0.047 MB" in out
    plan = load_plan(out_plan)
    assert validate_plan(tiny_model(), plan) == plan and len(set(plan.values())) > 1
    header = json.loads(out_plan.read_text())["talaria"]
    assert header["predicted"]["size_bytes"] <= 47_000 and header["compress_flags"] == "--group-size 16 --embed-bits 8 --act8"
    # The plan read back gives the same table.
    code, out, _ = talaria(
        capsys, "--model", str(folder), "--device-profile", "laptop-cpu", "--plan", str(out_plan), "--rule", "embed_tokens=8",
        "--act8", "--json", "--context", "64", "--prefill", "64",
    )  # fmt: skip
    assert json.loads(out)["totals"]["size_bytes"] == header["predicted"]["size_bytes"]


def test_an_unreachable_target_or_unknown_profile_is_one_clear_line(tmp_path, capsys):
    folder = make_tiny_folder(tmp_path / "tiny")
    code, _, err = talaria(capsys, "--model", str(folder), "--device-profile", "laptop-cpu", "--target-decode-ms", "0.001")
    assert code == 2 and "out of reach on laptop-cpu" in err and len(err.strip().splitlines()) == 1
    code, _, err = talaria(capsys, "--model", str(folder), "--device-profile", "toaster")
    assert code == 2 and "Unknown device profile 'toaster'" in err
    code, _, err = talaria(capsys, "--model", "no-such-thing")
    assert code == 2 and "neither a preset" in err


def test_this_machine_comes_from_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIPPIN_HOME", str(tmp_path))
    template = json.loads((devices.DEVICES_DIR / "this-machine.json").read_text())
    measured = {"memory_bandwidth_gbs": 20.0, "compute_tops": {"fp32": 0.1, "bf16": 0.2, "int8": 0.4}, "op_overhead_us": 2.0}
    write_json_atomic(devices.this_machine_cache(), template | measured | {"measured": {"host": devices._host()}})
    monkeypatch.setattr(devices, "measure_device", lambda **kw: pytest.fail("measured again"))
    code, out, _ = talaria(capsys, "--model", "tiny", "--json")
    assert code == 0 and json.loads(out)["device"]["memory_bandwidth_gbs"] == 20.0


def test_calibrate_on_compressed_folders_with_fidelity_reports(tmp_path, capsys):
    folders = []
    for i, (bits, kl) in enumerate([(2, 0.9), (3, 0.35), (4, 0.12)]):
        model, report = compressed_tiny(plan=dict.fromkeys(_linears(), bits), act8=True)
        folder = tmp_path / f"m{i}"
        meta = {"name": f"m{i}", "quantization": quantization_meta(report, CompressConfig(act8=True))}
        save_pippin(LoadedModel(model=model, tokenizer=None, path=folder, meta={}), folder, extra_meta=meta)
        result = {"suite": "fidelity", "metrics": {"ref": {"KL": 0.0}, f"m{i}": {"KL": kl}}, "headline": ["KL"]}
        write_json_atomic(folder / "fidelity" / "results.json", result)
        folders.append(str(folder))
    code, out, _ = talaria(capsys, "--model", "tiny", "--device-profile", "laptop-cpu", "--calibrate", *folders, "--json")
    assert code == 0
    cal = json.loads(out)["calibration"]
    assert cal["n_plans"] == 3 and [p["measured_kl"] for p in cal["points"]] == [0.9, 0.35, 0.12]
    assert cal["mean_rel_error"] < 0.5 and cal["scale"] > 0
    code, out, _ = talaria(capsys, "--model", folders[1], "--device-profile", "laptop-cpu", "--calibrate", *folders)
    assert code == 0 and "calibrated on 3 measured plans" in out and "3-bit x14" in out


def _linears():
    mods = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    return [f"layers.{i}.{m}" for i in range(2) for m in mods]


def test_compress_stores_sensitivities_that_talaria_reads_and_its_plan_compresses(tmp_path, capsys):
    """compress (allocating) -> sensitivity.json -> talaria auto plan -> compress --plan (no estimates: the file goes)."""
    folder = make_tiny_folder(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog, then naps in the sun. " * 60)
    out = tmp_path / "c"
    args = ["compress", str(folder), "--calib", str(calib), "--bpw", "4", "--no-fidelity", "--out", str(out), "--calib-seqs", "2"]
    assert main(args) == 0
    stored = json.loads((out / "sensitivity.json").read_text())
    assert len(stored["costs"]) == 14 and set(stored["costs"]["layers.0.mlp.up_proj"]) == {"2", "3", "4"}
    plan_file = tmp_path / "auto.json"
    code, text, _ = talaria(
        capsys, "--model", str(out), "--device-profile", "phone-npu", "--target-size-mb", "0.047", "--write-plan", str(plan_file)
    )
    assert code == 0 and f"stored: {out / 'sensitivity.json'}" in text
    assert main([*args[:7], "--out", str(tmp_path / "d"), "--plan", str(plan_file), "--calib-seqs", "2"]) == 0
    assert json.loads((tmp_path / "d" / "plan.json").read_text())["plan"] == load_plan(plan_file)
    assert not (tmp_path / "d" / "sensitivity.json").exists()
