"""Schemathesis against the live server's OpenAPI schema: generated requests that fit the schema and requests
that break it never get a 5xx, and the server still answers /health afterwards.

Uses schemathesis' strategies with hypothesis directly (its pytest plugin does not run under pytest 9).
A bounded number of examples per operation and mode keeps it to a few seconds; set SCHEMATHESIS_EXAMPLES=500
for a long run.
"""

from __future__ import annotations

import os

import pytest

httpx = pytest.importorskip("httpx")

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis import GenerationMode  # noqa: E402 - after the importorskip above

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "10"))


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(live, mode):
    ops = operations(live.url)
    names = {f"{op.method.upper()} {op.path}" for op in ops}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /v1/load_lora_adapter"} <= names
    seen: dict[int, int] = {}
    for op in ops:

        @hypothesis.settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), derandomize=True, database=None
        )
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def check(case) -> None:
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int) and case.body["max_tokens"] > 4:
                case.body["max_tokens"] = 4  # keep valid requests short; small values are validated all the same
            response = case.call(base_url=live.url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code}: {response.text[:300]}"
            )

        try:
            check()
        except hypothesis.errors.Unsatisfiable:  # an operation without inputs has no invalid variant
            assert mode == GenerationMode.NEGATIVE
    assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"
    assert sum(seen.values()) >= len(ops)  # it really sent requests
    if mode == GenerationMode.NEGATIVE:
        assert any(400 <= s < 500 for s in seen)
