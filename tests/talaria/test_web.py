"""Talaria's web API (FastAPI TestClient): it prices exactly what pippin.talaria.whatif prices, keeps the plans tried for
the Pareto plot, writes plans `pippin compress --plan` accepts, answers bad input with a 400 that says why, and mounts
under `pippin serve` at /talaria."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pippin.model.checkpoint import LoadedModel, save_pippin
from pippin.model.config import get_preset
from pippin.quant.compress import load_plan, validate_plan
from pippin.talaria.devices import load_profile
from pippin.talaria.ops import ops_table
from pippin.talaria.plan import is_linear, plan_from_config
from pippin.talaria.quality import prior_sensitivity
from pippin.talaria.web import TalariaView, create_app
from pippin.talaria.whatif import Rule, Target, TargetKind, apply_rules, auto, simulate
from tests.conftest import tiny_model

CTX = 64
DOWN = {"layers.0.mlp.down_proj": 3, "layers.1.mlp.down_proj": 3}


@pytest.fixture
def view(tmp_path):
    return TalariaView.open("tiny", device="laptop-cpu", context=CTX, prefill=CTX, plans_dir=tmp_path / "plans")


@pytest.fixture
def client(view):
    return TestClient(create_app(view))


def reference(plan):
    """The Python API's own answer for a plan of the tiny preset."""
    cfg = get_preset("tiny")
    base = plan_from_config(cfg)
    sens = prior_sensitivity(base, {r.name: r.params for r in ops_table(cfg, base, context=1, prefill=1)})
    return simulate(cfg, plan, load_profile("laptop-cpu"), sensitivity=sens, context=CTX, prefill=CTX), sens


def test_simulate_prices_edits_and_rules_as_the_python_api_does(client):
    info = client.get("/api/model").json()
    assert info["base"]["bits"] == plan_from_config(get_preset("tiny")).bits
    assert info["allowed"]["layers.0.mlp.down_proj"] == [2, 3, 4, 6, 8, 16, 32] and info["allowed"]["norm"] == [16, 32]
    assert {"laptop-cpu", "phone-npu", "datacenter-gpu"} <= set(info["devices"])
    r = client.post("/api/simulate", json={"edits": DOWN, "rules": ["*.gate_proj=4"], "label": "mine"})
    assert r.status_code == 200, r.text
    got = r.json()
    plan = apply_rules(plan_from_config(get_preset("tiny")).with_bits(DOWN), [Rule.parse("*.gate_proj=4")])
    want, sens = reference(plan)
    assert got["plan"]["bits"] == plan.bits
    assert got["plan"]["edits"] == DOWN | {"layers.0.mlp.gate_proj": 4, "layers.1.mlp.gate_proj": 4}
    assert got["totals"] == json.loads(json.dumps(want.summary()))  # floats survive JSON exactly
    assert [row["name"] for row in got["rows"]] == [r.name for r in want.rows]
    rows = {row["name"]: row for row in got["rows"]}
    for want_row, est in zip(want.rows, want.estimate.ops, strict=True):
        row = rows[want_row.name]
        assert (row["stored_bytes"], row["bits"], row["decode_s"]) == (want_row.stored_bytes, want_row.bits, pytest.approx(est.decode_s))
    down = rows["layers.0.mlp.down_proj"]
    assert down["kl"] == pytest.approx(want.op_kl["layers.0.mlp.down_proj"])
    assert down["kl_2bit"] == pytest.approx(sens.scale * sens.cost("layers.0.mlp.down_proj", 2)) and down["kl_2bit"] > down["kl_4bit"] > 0
    assert rows["norm"]["kl_2bit"] is None and "kl_2bit" not in rows["layers.0.self_attn.attention"]
    assert got["point"]["label"] == "mine" and got["point"]["size_bytes"] == want.estimate.size_bytes


def test_history_keeps_each_plan_once_and_the_references(client, view):
    for edits in (DOWN, {}, DOWN):
        assert client.post("/api/simulate", json={"edits": edits}).status_code == 200
    client.post("/api/simulate", json={"edits": DOWN, "device": "phone-npu"})
    h = client.get("/api/history").json()
    assert [p["edits"] for p in h["tried"]] == [{}, DOWN]  # the same plan twice is one point, the newest last
    assert client.get("/api/history?device=phone-npu").json()["tried"][0]["device"] == "phone-npu"
    refs = {p["label"]: p for p in h["references"]}
    cfg = get_preset("tiny")
    base = plan_from_config(cfg)
    for b in (2, 3, 4):
        uniform, _ = reference(base.with_bits({n: b for n in base.bits if is_linear(n)}))
        assert refs[f"linears at {b} bits"]["size_bytes"] == uniform.estimate.size_bytes
        assert refs[f"linears at {b} bits"]["predicted_kl"] == pytest.approx(uniform.predicted_kl)
    alloc = [p for p in h["references"] if p["label"].startswith("allocator")]
    assert len(alloc) == 3
    lo, hi = refs["linears at 2 bits"], refs["linears at 4 bits"]
    for p in alloc:  # between the uniform plans in size and in predicted quality
        assert lo["size_bytes"] < p["size_bytes"] < hi["size_bytes"] and hi["predicted_kl"] < p["predicted_kl"] < lo["predicted_kl"]


def test_auto_then_a_written_plan_that_compress_accepts(client, view, tmp_path):
    target = {"kind": "size_mb", "value": 0.095}
    r = client.post("/api/auto", json={"target": target, "bits": [2, 3, 4]})
    assert r.status_code == 200, r.text
    got = r.json()
    cfg = get_preset("tiny")
    base = plan_from_config(cfg)
    want = auto(
        cfg,
        base,
        load_profile("laptop-cpu"),
        Target(kind=TargetKind.SIZE_MB, value=0.095),
        sensitivity=view.sensitivity,
        context=CTX,
        prefill=CTX,
    )
    assert got["plan"]["bits"] == want.plan.bits and got["totals"]["size_bytes"] == want.estimate.size_bytes <= 95_000
    w = client.post("/api/plan", json={"edits": got["plan"]["edits"], "name": "small", "target": target})
    assert w.status_code == 200, w.text
    path = tmp_path / "plans" / "small.json"
    assert w.json()["path"] == str(path) and json.loads(path.read_text()) == w.json()["record"]
    header = w.json()["record"]["talaria"]
    assert header["target"] == target and header["predicted"]["size_bytes"] == want.estimate.size_bytes
    plan = load_plan(path)  # what `pippin compress --plan` reads, then checks against the model
    assert validate_plan(tiny_model(), plan) == want.plan.compress_plan() and len(plan) == 14


def test_without_a_plans_folder_the_plan_is_only_returned(tmp_path):
    client = TestClient(create_app(TalariaView.open("tiny", device="laptop-cpu")))
    r = client.post("/api/plan", json={"edits": DOWN, "name": "x"})
    assert r.status_code == 200 and r.json()["path"] is None and r.json()["record"]["plan"] == DOWN


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("simulate", {"edits": {"layers.0.mlp.gate": 3}}, "No op named 'layers.0.mlp.gate'"),
        ("simulate", {"edits": {"layers.0.self_attn.attention": 4}}, "No op named"),
        ("simulate", {"edits": {"layers.0.mlp.up_proj": 5}}, "cannot be stored at 5 bits"),
        ("simulate", {"edits": {"norm": 4}}, "cannot be stored at 4 bits"),
        ("simulate", {"edits": {"norm": "four"}}, "edits.norm"),
        ("simulate", {"rules": ["*.down_proj"]}, "PATTERN=BITS"),
        ("simulate", {"rules": ["*.nothing=3"]}, "matches no op"),
        ("simulate", {"device": "toaster"}, "Unknown device 'toaster'"),
        ("simulate", {"device": "/etc/hostname"}, "Unknown device"),
        ("simulate", {"edit": {}}, "edit: Extra inputs"),
        ("simulate", [1, 2], "must be a JSON object"),
        ("auto", {"target": {"kind": "size_mb", "value": 0.001}}, "out of reach"),
        ("auto", {"target": {"kind": "size_mb", "value": -1}}, "target.value"),
        ("auto", {"target": {"kind": "tokens", "value": 1}}, "target.kind"),
        ("auto", {"target": {"kind": "size_mb", "value": 0.1}, "bits": [5]}, "not widths a linear can take"),
        ("auto", {}, "target: Field required"),
        ("plan", {"name": "../escape"}, "A plan's name"),
        ("plan", {"name": ""}, "A plan's name"),
    ],
)
def test_bad_requests_get_a_400_that_says_why(client, tmp_path, path, body, message):
    r = client.post(f"/api/{path}", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert not (tmp_path / "escape.json").exists()


def test_malformed_json_and_unknown_routes(client):
    r = client.post("/api/simulate", content=b'{"edits": {', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "No route GET /api/nothing" in r.json()["error"]["message"]
    assert client.get("/docs").status_code == 404  # Swagger's page would load scripts from a CDN
    assert "/api/simulate" in client.get("/openapi.json").json()["paths"]
    assert client.post("/api/simulate", json={}).status_code == 200  # and the view goes on


def test_mounted_under_pippin_serve(tmp_path):
    """`pippin serve` mounts the view of its first model folder."""
    from pippin.commands.serve import mount_talaria

    folder = tmp_path / "tiny"
    save_pippin(LoadedModel(model=tiny_model(), tokenizer=None, path=folder, meta={}), folder)
    app = FastAPI()
    assert mount_talaria(app, folder, plans_dir=None) is None
    assert "not a model folder" in mount_talaria(FastAPI(), tmp_path, plans_dir=None)
    client = TestClient(app)
    page = client.get("/talaria")  # redirected to /talaria/: the page's relative URLs resolve under the mount
    assert page.status_code == 200 and str(page.url).endswith("/talaria/") and 'src="static/talaria.js"' in page.text
    assert client.get("/talaria/static/talaria.js").status_code == 200
    info = client.get("/talaria/api/model").json()
    assert info["model"] == str(folder) and info["plans_dir"] is None
    assert info["base"]["bits"] == plan_from_config(get_preset("tiny")).bits
    r = client.post("/talaria/api/simulate", json={"edits": DOWN})
    assert r.status_code == 200 and r.json()["plan"]["edits"] == DOWN


def test_pippin_talaria_serve_builds_the_view_and_refuses_other_hosts(tmp_path, monkeypatch, capsys):
    """`pippin talaria --serve` with the command's own plan edits (--rule) as the stored plan; a request addressed to
    another host name (DNS rebinding onto a loopback server) is refused."""
    import uvicorn

    from pippin.cli import main

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app, port=sockets[0].getsockname()[1]))
    args = ["talaria", "--model", "tiny", "--device-profile", "phone-npu", "--rule", "*.up_proj=4", "--serve", "--port", "0"]
    assert main([*args, "--plans-dir", str(tmp_path / "out"), "--context", "32"]) == 0
    assert f"http://127.0.0.1:{served['port']}/" in capsys.readouterr().out
    client = TestClient(served["app"], base_url="http://localhost")
    info = client.get("/api/model").json()
    assert info["device"] == "phone-npu" and info["context"] == 32 and info["base"]["bits"]["layers.1.mlp.up_proj"] == 4
    assert client.post("/api/plan", json={"name": "p"}).json()["record"]["plan"] == {f"layers.{i}.mlp.up_proj": 4 for i in (0, 1)}
    assert (tmp_path / "out" / "p.json").is_file()
    assert TestClient(served["app"], base_url="http://evil.example").get("/api/model").status_code == 400
    capsys.readouterr()
    assert main([*args, "--target-size-mb", "1"]) == 2 and "--serve starts the web view" in capsys.readouterr().err
