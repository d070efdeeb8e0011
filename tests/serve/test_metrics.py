"""The metrics' in-memory state stays bounded however long the server runs unscraped."""

from __future__ import annotations

import pytest

from pippin.serve import metrics as metrics_module
from pippin.serve.metrics import Metrics


def test_tok_s_snapshots_stay_bounded_without_scrapes(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    m = Metrics(window_s=10.0)
    for _ in range(50_000):  # 50,000 tokens at 20 tok/s: 42 minutes of generation, /metrics never scraped
        clock[0] += 0.05
        m.tokens()
    assert len(m._recent) <= 10.0 / 0.1 + 2
    assert m.tokens_per_second() == pytest.approx(20.0, rel=0.02)
