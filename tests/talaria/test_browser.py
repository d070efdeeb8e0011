"""Talaria's web view in headless Chromium (Debian's `chromium`, driven by playwright): load the tiny model's table,
sort it, filter it, select rows in the table and the block graph, set their bits and see the totals the Python API
computes for the same plan, apply a rule, undo, run auto, write a plan `pippin compress --plan` accepts, load a plan from
the Pareto plot and price it on another device.

Skipped when playwright or a chromium binary is missing (playwright's own browser download cannot work here), except
under CI (`CI` set), where `.ci/run` installs Debian's chromium and a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser test: Debian's chromium is missing (.ci/run installs it: apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")

from pippin.model.config import get_preset  # noqa: E402 - after the skips
from pippin.quant.compress import load_plan, validate_plan  # noqa: E402
from pippin.talaria.devices import load_profile  # noqa: E402
from pippin.talaria.plan import plan_from_config  # noqa: E402
from pippin.talaria.web import TalariaView, create_app  # noqa: E402
from pippin.talaria.whatif import Rule, Target, TargetKind, apply_rules, auto, simulate  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.serve.conftest import start_uvicorn  # noqa: E402

CTX = 64
TOTALS = {"size": "size_bytes", "bpw": "bpw", "decode": "decode_s", "prefill": "prefill_s", "energy": "decode_j", "kl": "predicted_kl"}


@contextlib.contextmanager
def served(view: TalariaView) -> Iterator[str]:
    """The view's app on 127.0.0.1 at a free port (uvicorn in a thread); yields its URL."""
    url, server, thread = start_uvicorn(create_app(view))
    try:
        yield url + "/"
    finally:
        server.should_exit = True
        thread.join(15)


def settle(page, seq: int) -> int:
    """Wait for the page's `seq`-th priced answer (every request that prices a plan counts one), and no error."""
    page.wait_for_function(f"Number(document.body.dataset.seq) >= {seq} && document.body.dataset.busy === '0'", timeout=15000)
    assert not page.locator("#status.error").count(), page.inner_text("#status")
    return seq + 1


def totals(page) -> dict[str, float]:
    return {key: float(page.get_attribute(f"#t-{card}", "data-value")) for card, key in TOTALS.items()}


def assert_totals(page, result) -> None:
    want = result.summary()
    assert totals(page) == pytest.approx({k: want[k] for k in TOTALS.values()}, rel=1e-12)


def test_view_sorts_filters_selects_simulates_and_writes_a_plan(tmp_path):
    cfg = get_preset("tiny")
    base = plan_from_config(cfg)
    view = TalariaView.open("tiny", device="laptop-cpu", context=CTX, prefill=CTX, plans_dir=tmp_path / "plans")
    dev = load_profile("laptop-cpu")
    kw = {"sensitivity": view.sensitivity, "context": CTX, "prefill": CTX}
    with served(view) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url)
            seq = settle(page, 1)
            rows = page.locator("#ops tbody tr")
            assert rows.count() == 25 and page.locator("#graph rect.node").count() == 25

            # Sort by decode latency (largest first), then smallest first.
            stored = simulate(cfg, base, dev, **kw)
            assert_totals(page, stored)
            decode = {e.name: e.decode_s for e in stored.estimate.ops}
            names = "trs => trs.map(t => t.dataset.name)"
            page.click("#ops th[data-key=decode_s]")
            shown = [decode[n] for n in page.eval_on_selector_all("#ops tbody tr", names)]
            assert shown == sorted(decode.values(), reverse=True) and page.inner_text("#ops th.sorted-desc") == "decode µs"
            page.click("#ops th[data-key=decode_s]")
            assert [decode[n] for n in page.eval_on_selector_all("#ops tbody tr", names)] == sorted(decode.values())

            # Filter, then click one row and shift-click another: both down projections, and their graph nodes.
            page.fill("#filter", "down_proj")
            assert rows.count() == 2
            rows.nth(0).click()
            rows.nth(1).click(modifiers=["Shift"])
            assert page.locator("#ops tbody tr.selected").count() == 2
            assert sorted(page.eval_on_selector_all("#graph rect.node.selected", names)) == [
                "layers.0.mlp.down_proj",
                "layers.1.mlp.down_proj",
            ]
            page.select_option("#bits", "3")
            page.click("#apply-bits")
            seq = settle(page, seq)
            down = base.with_bits({"layers.0.mlp.down_proj": 3, "layers.1.mlp.down_proj": 3})
            assert_totals(page, simulate(cfg, down, dev, **kw))
            assert page.locator("#ops tbody td.changed").count() == 2

            # A graph node click selects its row; select-all of a filter.
            page.fill("#filter", "")
            page.click('#graph rect.node[data-name="layers.1.self_attn.q_proj"]')
            assert page.eval_on_selector_all("#ops tbody tr.selected", names) == ["layers.1.self_attn.q_proj"]
            page.select_option("#kind", "linear")
            page.click("#select-all")
            assert page.inner_text("#selcount") == "14 selected"
            page.select_option("#kind", "")

            # A rule on top of the edit, then undo back to the edit.
            page.fill("#rule", "*.gate_proj=2")
            page.click("#apply-rule")
            seq = settle(page, seq)
            ruled = apply_rules(down, [Rule.parse("*.gate_proj=2")])
            assert_totals(page, simulate(cfg, ruled, dev, **kw))
            page.click("#undo")
            seq = settle(page, seq)
            assert_totals(page, simulate(cfg, down, dev, **kw))

            # Auto for a size budget from the current plan.
            page.select_option("#target-kind", "size_mb")
            page.fill("#target-value", "0.095")
            page.click("#auto")
            seq = settle(page, seq)
            target = Target(kind=TargetKind.SIZE_MB, value=0.095)
            solved = auto(cfg, down, dev, target, bits=(2, 3, 4), **kw)
            assert_totals(page, solved)
            assert totals(page)["size_bytes"] <= 95_000

            # The Pareto plots hold the references and the four plans tried, and mark the current one.
            tried = page.locator("#pareto-size .pt.tried").count()
            assert tried == 4 and page.locator("#pareto-latency .pt.ref").count() >= 5
            assert page.locator("#pareto-size .pt.current").count() == 1 and page.locator("#pareto-size path.front").count() == 1

            # Write the plan: the file is what compress reads, and it is offered as a download too.
            page.fill("#plan-name", "browser-plan")
            page.click("#write")
            seq = settle(page, seq)
            path = tmp_path / "plans" / "browser-plan.json"
            assert page.get_attribute("#written", "data-path") == str(path)
            plan = load_plan(path)
            assert validate_plan(tiny_model(), plan) == solved.plan.compress_plan()
            with page.expect_download() as dl:
                page.click("#download")
            assert dl.value.suggested_filename == "browser-plan.json"

            # A reference point of the Pareto plot loads its plan; another device prices the same plan there.
            page.click('#pareto-size .pt.ref[data-label="linears at 2 bits"]')
            seq = settle(page, seq)
            two = base.with_bits({n: 2 for n in base.bits if n.endswith("_proj")})
            assert_totals(page, simulate(cfg, two, dev, **kw))
            page.select_option("#device", "phone-npu")
            seq = settle(page, seq)
            assert_totals(page, simulate(cfg, two, load_profile("phone-npu"), **kw))

            # A width the selection cannot take is refused with a message, and nothing changes.
            page.click('#graph rect.node[data-name="norm"]')
            page.select_option("#bits", "3")
            page.click("#apply-bits")
            assert "None of the 1 selected ops can take 3 bits" in page.inner_text("#status.error")
            assert_totals(page, simulate(cfg, two, load_profile("phone-npu"), **kw))
            assert not errors, errors
            assert all(u.startswith((url, "blob:", "data:")) for u in requested), requested  # nothing from a CDN
        finally:
            browser.close()
