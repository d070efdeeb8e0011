"""The OpenAI API against a live server on 127.0.0.1, with the official `openai` client and raw httpx.

Outputs are checked against the same request run alone through the Engine on a second copy of the model.
"""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from pippin.adapters.lora import LoraConfig, apply_lora
from pippin.adapters.peft_format import save_adapter
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from tests.adapters.test_lora import random_adapter
from tests.conftest import tiny_model
from tests.serve.conftest import paused, start_server, tiny_config

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """A second, independent copy of the served model: greedy ids for (prompt ids, adapter)."""
    from pippin.serve.service import load_base

    base = load_base(str(tiny_dir), tiny_config())
    engine = Engine(base.loaded.model, max_len=256, adapters=base.store)
    engine.eos_ids = []

    def run(prompt_ids: list[int], n: int, adapter: str | None = None) -> str:
        ids = engine.generate_ids([prompt_ids], SamplingParams(max_new_tokens=n), adapters=[adapter])[0]
        return base.tokenizer.decode(ids)

    run.tokenizer = base.tokenizer
    return run


def test_models_lists_the_base_and_each_adapter(client):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny", "tiny:summarize", "tiny:polite"}
    assert ids["tiny:summarize"].model_extra["parent"] == "tiny"
    assert client.models.retrieve("tiny:polite").id == "tiny:polite"


@pytest.mark.parametrize("model", ["tiny", "tiny:summarize", "summarize", "default"])
def test_chat_greedy_equals_the_engine_alone_and_counts_usage(client, reference, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    prompt = reference.tokenizer.encode_chat(CHAT)
    adapter = None if model in ("tiny", "default") else "summarize"
    assert r.choices[0].message.content == reference(prompt, 12, adapter)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 12, len(prompt) + 12)
    assert r.model == model and r.object == "chat.completion"


def test_an_adapter_changes_the_reply(client):
    texts = {
        m: client.chat.completions.create(model=m, messages=CHAT, max_tokens=12, temperature=0).choices[0].message.content
        for m in ("tiny", "tiny:summarize", "tiny:polite")
    }
    assert len(set(texts.values())) == 3


def test_chat_streaming_deltas_add_up_to_the_whole_reply(client):
    whole = client.chat.completions.create(model="tiny:polite", messages=CHAT, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="tiny:polite", messages=CHAT, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed


def test_a_chats_next_turn_reuses_the_cached_prefix_and_answers_the_same(client, live, reference):
    """The prefix cache (on by default): turn 2's prompt starts with turn 1's prompt and reply, which a cache row
    holds, so at least turn 1's prompt is not prefilled again; the reply still equals the engine alone."""
    stats = live.service.bases["tiny"].scheduler.stats
    turn1 = [{"role": "user", "content": "tell me about the sea"}]
    reply = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=10, temperature=0).choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the shore"}]
    before = stats.reused_tokens
    got = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=10, temperature=0).choices[0].message.content
    assert stats.reused_tokens - before >= len(reference.tokenizer.encode_chat(turn1))
    assert got == reference(reference.tokenizer.encode_chat(turn2), 10)
    text = httpx.get(live.url + "/metrics").text
    assert re.search(r'^pippin_prefix_reused_tokens_total\{model="tiny"\} [1-9]', text, re.M)


def test_continuous_usage_counts_the_tokens_on_every_chunk(client):
    """stream_options.continuous_usage_stats (vLLM's): each chunk carries the counts so far, so a client can count
    tokens when a chunk holds several; the counts climb to the final usage."""
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content]
    assert counts == list(range(1, 21))  # one token per chunk here (stream_interval_ms=0), every token has text
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == chunks[-2].usage.prompt_tokens > 0


def test_a_stream_interval_sends_the_first_text_at_once_and_holds_the_rest(tiny_dir):
    """stream_interval_ms: the first text goes out at once (TTFT), later text at most that often, the end at once."""
    srv = start_server(tiny_config(stream_interval_ms=1000), [str(tiny_dir)])
    try:
        client = openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0, timeout=30)
        whole = client.chat.completions.create(model="tiny:polite", messages=CHAT, max_tokens=20, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny:polite", messages=CHAT, max_tokens=20, temperature=0, stream=True))
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content) == 2 and len(content[0]) <= 2  # one token's text, then the rest with the end
        assert "".join(content) == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        srv.stop()


def test_stop_string_cuts_the_reply_in_plain_and_streaming_mode(client):
    full = client.completions.create(model="tiny", prompt="the cat", max_tokens=30, temperature=0.9, seed=3).choices[0].text
    stop = full[8:10]
    want = full[: full.find(stop)]
    cut = client.completions.create(model="tiny", prompt="the cat", max_tokens=30, temperature=0.9, seed=3, stop=[stop])
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="the cat", max_tokens=30, temperature=0.9, seed=3, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_completions_with_n_samples_several_prompts_and_token_ids(client, reference):
    r = client.completions.create(model="tiny", prompt="once upon", max_tokens=10, n=3, temperature=1.0, seed=42)
    texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = client.completions.create(model="tiny", prompt="once upon", max_tokens=10, n=3, temperature=1.0, seed=42)
    assert [c.text for c in again.choices] == texts  # seeds make sampling reproducible
    ids, ids2 = reference.tokenizer.encode("once upon"), reference.tokenizer.encode("a b")
    multi = client.completions.create(model="tiny", prompt=[ids, ids2], max_tokens=6, temperature=0)
    assert [c.text for c in multi.choices] == [reference(ids, 6), reference(ids2, 6)]
    assert multi.usage.prompt_tokens == len(ids) + len(ids2) and multi.usage.completion_tokens == 12
    texts = client.completions.create(model="tiny", prompt=["once upon", "a b"], max_tokens=6, temperature=0)
    assert [c.text for c in texts.choices] == [c.text for c in multi.choices]


def test_n_samples_stream_on_separate_indexes(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2, temperature=1.0, seed=1, stream=True)
    texts = {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2, temperature=1.0, seed=1)
    assert texts == {c.index: c.message.content for c in plain.choices}


# --- bad input: 4xx in OpenAI's error shape, and the server keeps serving ------------------------------

BAD = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("unknown model", {"model": "gpt-9", "messages": CHAT}, 404, "model_not_found"),
    ("unknown adapter", {"model": "tiny:nope", "messages": CHAT}, 404, "model_not_found"),
    ("unknown base", {"model": "big:summarize", "messages": CHAT}, 404, "model_not_found"),
    ("negative max_tokens", {"model": "tiny", "messages": CHAT, "max_tokens": -1}, 400, None),
    ("huge max_tokens", {"model": "tiny", "messages": CHAT, "max_tokens": 10**9}, 400, None),
    (
        "max_tokens past the context",
        {"model": "tiny", "messages": [{"role": "user", "content": "word " * 15}], "max_tokens": 200, "stream": True},
        400,
        "context_length_exceeded",
    ),
    (
        "prompt over the context",
        {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]},
        400,
        "context_length_exceeded",
    ),
    ("messages not a list", {"model": "tiny", "messages": "hi"}, 400, None),
    ("temperature a string", {"model": "tiny", "messages": CHAT, "temperature": "hot"}, 400, None),
    ("n zero", {"model": "tiny", "messages": CHAT, "n": 0}, 400, None),
    ("n over the batch", {"model": "tiny", "messages": CHAT, "n": 9}, 400, None),
    ("bad role", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("no messages", {"model": "tiny", "messages": []}, 400, None),
    ("missing model", {"messages": CHAT}, 400, None),
    ("too many stops", {"model": "tiny", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ("unsupported penalty", {"model": "tiny", "messages": CHAT, "frequency_penalty": 1.0}, 400, None),
    ("lone surrogate", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("NaN temperature", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
]


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"min_p": 0.99999}, {"repetition_penalty": 1e-9}])
def test_extreme_but_valid_sampling_values_still_answer(http, extreme):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3, **extreme})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


@pytest.mark.parametrize(("what", "body", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(http, what, body, status, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = http.post("/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and len(err["message"]) > 20 and err["type"] == "invalid_request_error"
    assert err["code"] == code


def test_bad_completions_input_and_unknown_routes(http):
    for body in ({"model": "tiny", "prompt": [999999]}, {"model": "tiny", "prompt": []}, {"model": "tiny", "prompt": "x", "echo": True}):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), body
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    assert http.get("/v1/chat/completions").status_code == 405
    r = http.post("/v1/chat/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_server_keeps_serving_after_bad_input(http, client):
    for body, _, _, _ in [(b[1], 0, 0, 0) for b in BAD]:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        http.post("/v1/chat/completions", **kw)
    assert http.get("/health").json()["status"] == "ok"
    assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3).usage.completion_tokens == 3


# --- limits, disconnects, runtime adapters, metrics -------------------------------------------------------


def test_past_the_limits_a_request_gets_429_not_a_hang(tiny_dir):
    srv = start_server(tiny_config(max_batch=1, max_queue=1), [str(tiny_dir)])
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as http, paused(srv.service):
            body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as first, http.stream("POST", "/v1/chat/completions", json=body):
                assert first.status_code == 200
                r = http.post("/v1/chat/completions", json={**body, "stream": False})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        with httpx.Client(base_url=srv.url, timeout=10) as http:  # capacity returns once they are done
            assert http.post("/v1/chat/completions", json={**body, "stream": False}).status_code == 200
    finally:
        srv.stop()


def _wait(cond, timeout: float = 10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(live, stream):
    sched = live.service.default.scheduler
    before = sched.stats.generated_tokens
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 200, "ignore_eos": True, "stream": stream}
    with paused(live.service):
        if stream:
            with httpx.Client(base_url=live.url, timeout=10) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
        else:  # the client gives up waiting for the whole reply
            with httpx.Client(base_url=live.url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=body)
        assert _wait(lambda: sched.n_waiting + sched.n_running == 1)
        assert _wait(lambda: any(t.cancelled for t in sched._waiting) or any(r and r.ticket.cancelled for r in sched.rows))
    assert _wait(lambda: not sched.has_work)
    assert sched.stats.generated_tokens - before < 200


@pytest.fixture
def own_server(tiny_dir, tmp_path):
    """A server of its own, for a test that changes the adapter list (adapters may load from the test's tmp_path)."""
    srv = start_server(tiny_config(adapter_roots=[str(tmp_path)]), [str(tiny_dir)])
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        yield srv, openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0, timeout=30), http
    srv.stop()


def test_adapters_load_and_unload_at_runtime(own_server, tmp_path):
    live, client, http = own_server
    shaped = tiny_model(0)
    apply_lora(shaped, LoraConfig(rank=4), n_slots=2)
    save_adapter(random_adapter(shaped, "fresh", seed=7, scale=1.0), tmp_path / "fresh")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "fresh")})
    assert r.status_code == 200 and r.json()["model"] == "tiny:fresh"
    assert "tiny:fresh" in {m.id for m in client.models.list().data}
    fresh = client.chat.completions.create(model="tiny:fresh", messages=CHAT, max_tokens=10, temperature=0).choices[0].message.content
    base = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0).choices[0].message.content
    assert fresh != base
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "fresh")}).status_code == 400
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "missing")}).status_code == 400
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(bad)})
    assert r.status_code == 400 and "bad" not in {m.id.split(":")[-1] for m in client.models.list().data}
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    assert "fresh" not in live.service.default.store.loaded()
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "never"}).status_code == 404
    # Unloading unregisters a runtime-loaded adapter (as vLLM does); loading it again gives the same result.
    assert http.post("/v1/chat/completions", json={"model": "tiny:fresh", "messages": CHAT}).status_code == 404
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "fresh")}).status_code == 200
    again = client.chat.completions.create(model="tiny:fresh", messages=CHAT, max_tokens=10, temperature=0).choices[0].message.content
    assert again == fresh


def test_an_internal_bug_gets_a_500_in_shape_and_the_connection_keeps_working(own_server, monkeypatch):
    live, client, http = own_server

    def broken(req):
        raise RuntimeError("a bug")

    monkeypatch.setattr(live.service, "prepare_chat", broken)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "RuntimeError" in r.json()["error"]["message"]
    monkeypatch.undo()
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 2})  # same keep-alive connection
    assert r.status_code == 200
    metrics = http.get("/metrics").text
    assert 'pippin_requests_total{endpoint="/v1/chat/completions",status="500"} 1' in metrics


LINE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+$')


def test_metrics_are_prometheus_text_with_the_serving_numbers(client, http):
    client.chat.completions.create(model="tiny:summarize", messages=CHAT, max_tokens=4)
    client.chat.completions.create(model="tiny:summarize", messages=CHAT, max_tokens=30)
    r = http.get("/metrics")
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    text = r.text
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        assert LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    assert values["pippin_time_to_first_token_seconds_count"] >= 1
    assert values["pippin_generation_tokens_total"] >= 4
    assert values['pippin_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values['pippin_adapter_cache_misses_total{model="tiny"}'] >= 1
    assert values['pippin_adapter_cache_hits_total{model="tiny"}'] >= 1
    assert values['pippin_max_batch{model="tiny"}'] == 4
    for name in ("pippin_queue_depth", "pippin_batch_size", "pippin_running", "pippin_kv_cache_bytes", "pippin_adapter_memory_bytes"):
        assert f'{name}{{model="tiny"}}' in values
    assert values["pippin_process_resident_memory_bytes"] > 10 << 20
    assert values["pippin_generation_tokens_per_second"] > 0  # tokens were generated within the last 10 s


def test_health_and_the_web_page(http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ["tiny"]
    page = http.get("/")
    assert page.status_code == 200 and '<select id="model"' in page.text and "/static/app.js" in page.text
    js = http.get("/static/app.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text
    assert "https://" not in page.text + js.text  # nothing from outside
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    json.dumps(schema)


def test_a_worker_loop_that_dies_answers_the_waiting_requests(own_server, monkeypatch):
    """A bug outside a scheduler step kills the worker loop: the queued request gets a 503 at once instead of hanging,
    and so does every later one; /health says down."""
    import threading

    from pippin.engine.scheduler import BatchScheduler

    live, client, http = own_server
    sched = live.service.default.scheduler
    replies = []
    with paused(live.service):
        t = threading.Thread(
            target=lambda: replies.append(http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT}, timeout=10))
        )
        t.start()
        for _ in range(500):
            if sched.n_waiting:
                break
            threading.Event().wait(0.01)
        assert sched.n_waiting == 1

        def broken(self):  # noqa: ANN001, ANN202
            raise RuntimeError("a bug in the loop")

        monkeypatch.setattr(BatchScheduler, "has_work", property(broken))
    t.join(15)
    assert replies and replies[0].status_code == 503
    monkeypatch.undo()
    assert http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT}).status_code == 503
    assert http.get("/health").json()["status"] == "down"


def test_too_many_rows_are_refused_before_any_prompt_is_tokenized(own_server, monkeypatch):
    """n x prompts over the batch is known from the request's shape: answered 400 without tokenizing a single prompt
    (a 4 MiB body of 100k strings must not occupy the worker pool)."""
    live, client, http = own_server
    tok = live.service.default.tokenizer
    calls = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": ["some text"] * 5000, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and calls == []
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "n": 64, "max_tokens": 2})
    assert r.status_code == 400 and calls == []


def test_runtime_adapters_load_only_from_the_adapter_roots(own_server, tmp_path_factory):
    """lora_path outside the model's adapters folder and the --adapter-root folders is refused before the server looks
    at it: the same 403 whether the folder exists or not, so the endpoint cannot probe the disk."""
    live, client, http = own_server
    outside = tmp_path_factory.mktemp("elsewhere")
    shaped = tiny_model(0)
    apply_lora(shaped, LoraConfig(rank=4), n_slots=2)
    save_adapter(random_adapter(shaped, "far", seed=3, scale=1.0), outside / "far")
    for path in (outside / "far", outside / "missing", "/etc", f"{outside}/../../etc"):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "far", "lora_path": str(path)})
        assert r.status_code == 403 and "adapter root" in r.json()["error"]["message"], path
    assert "far" not in [m.id for m in client.models.list().data]


def test_a_loopback_server_refuses_requests_for_other_host_names(http):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 sends Host: evil.example; refused."""
    assert http.get("/v1/models", headers={"Host": "evil.example"}).status_code == 403
    assert (
        http.post("/v1/chat/completions", headers={"Host": "evil.example:80"}, json={"model": "tiny", "messages": CHAT}).status_code == 403
    )
    for ok in ("localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST:1"):
        assert http.get("/v1/models", headers={"Host": ok}).status_code == 200, ok


def test_an_api_key_guards_every_v1_route_and_the_official_client_sends_it(tiny_dir):
    """--api-key: /v1 answers 401 (OpenAI's invalid_api_key) without the bearer token or with a wrong one, and serves
    with it; the page and /health stay open, so the playground can load and ask for the key."""
    key = "s3cret-key-for-tests"
    srv = start_server(tiny_config(api_key=key), [str(tiny_dir)])
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            for headers in ({}, {"Authorization": "Bearer wrong-key-here"}, {"Authorization": key}, {"Authorization": f"Basic {key}"}):
                r = http.get("/v1/models", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
                assert r.headers["www-authenticate"] == "Bearer"
            body = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
            assert http.post("/v1/chat/completions", json=body).status_code == 401
            assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}).status_code == 401
            assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
            assert http.get("/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200
        good = openai.OpenAI(base_url=srv.api, api_key=key, max_retries=0, timeout=30)
        assert good.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.api, api_key="not-the-key", max_retries=0, timeout=30).models.list()
    finally:
        srv.stop()


def test_a_request_past_its_deadline_gets_503_while_waiting(tiny_dir):
    """--request-timeout: a request that cannot start before its deadline (the worker is held here) is answered 503
    deadline_exceeded instead of waiting on."""
    import threading
    import time

    srv = start_server(tiny_config(request_timeout_s=0.3), [str(tiny_dir)])
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            out = {}
            with paused(srv.service):
                body = {"model": "tiny", "messages": CHAT}
                t = threading.Thread(target=lambda: out.update(r=http.post("/v1/chat/completions", json=body)))
                t.start()
                time.sleep(0.6)  # past the deadline while the worker is held
            t.join(30)
        r = out["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    finally:
        srv.stop()
