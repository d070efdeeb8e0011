"""Systems under test: spec parsing, OpenAISystem against a local chat-completions server (body, retries, refusals,
an unreachable port), and PippinSystem on a tiny model (batched replies equal one-at-a-time replies)."""

import socket

import pytest

from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.eval.runner import Request, run_requests
from pippin.eval.systems import EndpointError, OpenAISystem, PippinSystem, System, parse_spec
from tests.conftest import tiny_model
from tests.eval.stubs import ByteTokenizer, ChatServer, completion, last_user

HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    "text,kind,model,adapter,url",
    [
        ("pippin:default", "pippin", None, None, None),
        ("pippin:default:summarize", "pippin", None, "summarize", None),
        ("pippin:/m/q35", "pippin", "/m/q35", None, None),
        ("pippin:/m/q35:recovery", "pippin", "/m/q35", "recovery", None),
        ("openai:http://127.0.0.1:8000/v1#smollm", "openai", "smollm", None, "http://127.0.0.1:8000/v1"),
        ("openai:https://api.example.com/v1", "openai", None, None, "https://api.example.com/v1"),
    ],
)
def test_parse_spec(text, kind, model, adapter, url):
    spec = parse_spec(text)
    assert (spec.kind, spec.model, spec.adapter, spec.url) == (kind, model, adapter, url)


@pytest.mark.parametrize(
    "text,message",
    [
        ("default", "is not understood"),
        ("hf:gpt2", "unknown kind 'hf'"),
        ("pippin:/m:", "name a model and optionally an adapter"),
        ("openai:localhost:8000", "must be an http(s) URL"),
    ],
)
def test_parse_spec_errors(text, message):
    with pytest.raises(PippinError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(text)


def test_openai_system_speaks_chat_completions():
    def answer(body, headers):
        return 200, completion(f"{body['model']}:{last_user(body['messages']).upper()}")

    with ChatServer(answer) as server:
        system = OpenAISystem(server.url, "tiny", api_key="k123", concurrency=3)
        assert isinstance(system, System) and system.spec == f"openai:{server.url}#tiny"
        params = SamplingParams(max_new_tokens=7, temperature=0.5, seed=3, stop=("\n\n",), top_k=20)
        convs = [[{"role": "user", "content": f"msg {i}"}] for i in range(5)]
        assert system.generate(convs, params) == [f"tiny:MSG {i}" for i in range(5)]
    body, headers = server.requests[0]
    assert body["max_tokens"] == 7 and body["temperature"] == 0.5 and body["seed"] == 3 and body["stop"] == ["\n\n"]
    assert body["top_k"] == 20 and "min_p" not in body and "repetition_penalty" not in body
    assert headers["Authorization"] == "Bearer k123"


def test_openai_system_retries_server_errors_and_bad_replies():
    replies = iter([(503, "busy"), (200, "{not json"), (200, {"choices": []}), (200, completion("finally"))])
    with ChatServer(lambda body, headers: next(replies)) as server:
        system = OpenAISystem(server.url, retries=3, backoff_s=0.001)
        assert system.generate([HELLO], SamplingParams()) == ["finally"]
    assert len(server.requests) == 4


def test_openai_system_gives_up_after_retries_with_an_endpoint_error():
    with ChatServer(lambda body, headers: (500, "boom")) as server:
        system = OpenAISystem(server.url, retries=2, backoff_s=0.001)
        with pytest.raises(EndpointError, match="failed after 3 attempts .*HTTP 500: boom"):
            system.generate([HELLO], SamplingParams())
    assert len(server.requests) == 3


def test_openai_system_does_not_retry_a_bad_request():
    with ChatServer(lambda body, headers: (400, '{"error": "context too long"}')) as server:
        system = OpenAISystem(server.url, retries=3, backoff_s=0.001)
        with pytest.raises(PippinError, match="HTTP 400.*context too long") as e:
            system.generate([HELLO], SamplingParams())
        assert not isinstance(e.value, EndpointError)
    assert len(server.requests) == 1


def test_unreachable_endpoint_becomes_error_entries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    system = OpenAISystem(f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.001, timeout_s=2)
    outs = run_requests(system, [Request(id=str(i), messages=HELLO) for i in range(3)], SamplingParams())
    assert [o.ok for o in outs] == [False, False, False]
    assert all("failed after 2 attempts" in o.error and "ConnectionRefused" in o.error for o in outs)


@pytest.fixture(scope="module")
def tiny_system():
    engine = Engine(tiny_model(), max_batch=2, max_len=128)
    return PippinSystem(engine, ByteTokenizer(), spec="pippin:tiny", batch_size=2)


def test_pippin_system_batched_equals_one_at_a_time(tiny_system):
    params = SamplingParams(max_new_tokens=6)
    convs = [[{"role": "user", "content": text}] for text in ("hi", "a longer prompt", "x")]
    batched = tiny_system.generate(convs, params)
    single = [tiny_system.generate([c], params)[0] for c in convs]
    assert batched == single and len(set(batched)) > 1  # random weights, different prompts: different replies
    assert all(0 < len(t.encode("latin-1")) <= 6 for t in batched)


def test_pippin_system_ends_a_reply_at_a_stop_string(tiny_system):
    """A reply is cut right before the first stop string, and its row ends there instead of running to max tokens."""
    conv = [[{"role": "user", "content": "a longer prompt"}]]
    full = tiny_system.generate(conv, SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = full[3:5]
    steps = tiny_system.engine.core.stats.steps
    cut = tiny_system.generate(conv, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert cut == full[: full.index(stop)]
    assert tiny_system.engine.core.stats.steps - steps < steps


def test_pippin_system_refuses_a_prompt_longer_than_its_context(tiny_system):
    with pytest.raises(PippinError, match="exceeds the context of 128 tokens"):
        tiny_system.generate([[{"role": "user", "content": "word " * 40}]], SamplingParams(max_new_tokens=4))
    outs = run_requests(
        tiny_system,
        [Request(id="long", messages=[{"role": "user", "content": "word " * 40}]), Request(id="short", messages=HELLO)],
        SamplingParams(max_new_tokens=4),
    )
    assert not outs[0].ok and "exceeds the context" in outs[0].error and outs[1].ok


def test_pippin_system_with_an_adapter_equals_the_merged_model():
    from tests.adapters.test_lora import dense_reference, random_adapter, served

    model, store = served()
    adapter = random_adapter(model, "a", seed=1)
    store.put(adapter)
    engine = Engine(model, max_batch=2, max_len=128, adapters=store)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    convs = [[{"role": "user", "content": text}] for text in ("hi", "a longer prompt", "x")]
    with_adapter = PippinSystem(engine, ByteTokenizer(), spec="pippin:tiny:a", adapter="a", batch_size=2).generate(convs, params)
    base = PippinSystem(engine, ByteTokenizer(), spec="pippin:tiny", batch_size=2).generate(convs, params)
    merged = PippinSystem(Engine(dense_reference(model, adapter), max_len=128), ByteTokenizer(), spec="merged").generate(convs, params)
    assert with_adapter == merged and with_adapter != base


def test_runner_sends_a_pippin_system_chunks_larger_than_its_rows(tiny_system, monkeypatch):
    sizes = []
    real = tiny_system.generate
    monkeypatch.setattr(tiny_system, "generate", lambda convs, params: sizes.append(len(convs)) or real(convs, params))
    reqs = [Request(id=str(i), messages=[{"role": "user", "content": f"q{i}"}]) for i in range(11)]
    outs = run_requests(tiny_system, reqs, SamplingParams(max_new_tokens=3), batch_size=2)
    assert all(o.ok for o in outs) and sizes == [8, 3]  # chunk_size = 4 rows' worth, the scheduler keeps 2 rows busy
    assert tiny_system.engine.core.stats.last_batch <= 2
