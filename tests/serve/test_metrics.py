"""The server's metrics: read back with prometheus_client's own parser, one registry per server, bounded state."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pippin.serve import metrics as metrics_module
from pippin.serve.metrics import Metrics


def scrape(m: Metrics) -> dict[str, tuple[str, dict[tuple, float]]]:
    """{family name: (type, {(sample name, sorted labels): value})} as a Prometheus server would read it."""
    return {
        f.name: (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
        for f in text_string_to_metric_families(m.render().decode())
    }


def test_exposition_parses_with_the_prometheus_parser():
    busy = 1_234_567.891  # 14 days of model time: a counter must keep its decimals
    m = Metrics(lambda: [("pippin_busy_seconds_total", {"model": "m"}, busy), ("pippin_queue_depth", {"model": "m"}, 3)])
    m.request_done("/v1/chat/completions", 200)
    m.request_done("/v1/chat/completions", 200)
    m.request_done("/v1/completions", 400)
    m.tokens(5)
    m.generation_done(prompt_tokens=7, ttft_s=0.07, total_s=1.07, completion_tokens=5)
    got = scrape(m)
    kind, requests = got["pippin_requests"]
    assert kind == "counter"
    assert requests[("pippin_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 2
    assert requests[("pippin_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] == 1
    assert got["pippin_prompt_tokens"][1][("pippin_prompt_tokens_total", ())] == 7
    assert got["pippin_generation_tokens"][1][("pippin_generation_tokens_total", ())] == 5
    kind, ttft = got["pippin_time_to_first_token_seconds"]
    assert kind == "histogram"
    assert ttft[("pippin_time_to_first_token_seconds_bucket", (("le", "0.05"),))] == 0
    assert ttft[("pippin_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 1
    assert ttft[("pippin_time_to_first_token_seconds_count", ())] == 1
    assert ttft[("pippin_time_to_first_token_seconds_sum", ())] == pytest.approx(0.07)
    # 4 tokens after the first in 1.0 s.
    assert got["pippin_request_decode_tokens_per_second"][1][("pippin_request_decode_tokens_per_second_sum", ())] == pytest.approx(4.0)
    assert got["pippin_busy_seconds"] == ("counter", {("pippin_busy_seconds_total", (("model", "m"),)): busy})
    assert got["pippin_queue_depth"] == ("gauge", {("pippin_queue_depth", (("model", "m"),)): 3})
    assert got["pippin_process_resident_memory_bytes"][1][("pippin_process_resident_memory_bytes", ())] > 10 << 20
    assert got["pippin_uptime_seconds"][0] == "gauge"


def test_each_server_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.request_done("/v1/models", 200)
    assert ("pippin_requests_total", (("endpoint", "/v1/models"), ("status", "200"))) in scrape(a)["pippin_requests"][1]
    assert scrape(b)["pippin_requests"][1] == {}


def test_tok_s_snapshots_stay_bounded_without_scrapes(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    m = Metrics(window_s=10.0)
    for _ in range(50_000):  # 50,000 tokens at 20 tok/s: 42 minutes of generation, /metrics never scraped
        clock[0] += 0.05
        m.tokens()
    assert len(m._recent) <= 10.0 / 0.1 + 2
    assert m.tokens_per_second() == pytest.approx(20.0, rel=0.02)
