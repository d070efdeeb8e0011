"""The server on the real default model (SmolLM2-135M-Instruct): a correct answer through the openai client,
and concurrent requests batched together that give the same text as each request alone."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.serve.conftest import start_server, tiny_config

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_server():
    srv = start_server(tiny_config(max_len=512, max_batch=4), ["default"])
    yield srv
    srv.stop()


def ask(client, question: str, **kw) -> str:
    r = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24, **kw
    )
    return r.choices[0].message.content


def test_real_model_answers_and_streams(real_server):
    client = openai.OpenAI(base_url=real_server.api, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data][0] == "smollm2-135m-instruct"
    answer = ask(client, "What is the capital of France?")
    assert "Paris" in answer
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer


def test_real_model_concurrent_requests_equal_each_alone(real_server):
    client = openai.OpenAI(base_url=real_server.api, api_key="unused", max_retries=0, timeout=120)
    questions = ["Name a primary color.", "What is 2 + 2?", "Write one word about the sea."]
    alone = [ask(client, q) for q in questions]
    before = real_server.service.default.scheduler.stats.steps
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda q: ask(client, q), questions))
    steps = real_server.service.default.scheduler.stats.steps - before
    assert together == alone
    assert steps < 3 * 24  # they shared decode steps


def test_real_model_second_turn_reuses_the_first_and_stays_on_topic(real_server):
    """The prefix cache on the real model: turn 2 prefills only what turn 1 did not leave in the cache, and the answer
    still follows the conversation."""
    client = openai.OpenAI(base_url=real_server.api, api_key="unused", max_retries=0, timeout=120)
    stats = real_server.service.default.scheduler.stats
    turn1 = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=turn1, temperature=0, max_tokens=24)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "And of Italy?"}]
    before = stats.reused_tokens
    second = client.chat.completions.create(model="smollm2-135m-instruct", messages=turn2, temperature=0, max_tokens=24)
    assert stats.reused_tokens - before >= first.usage.prompt_tokens
    assert "Rome" in second.choices[0].message.content
