"""The runner: batching, the JSONL cache (keys, reuse, a partial last line), resume after a real kill, and errors
that are recorded instead of scored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pippin.engine.sampling import SamplingParams
from pippin.eval.runner import GenerationCache, Request, run_requests
from tests.eval.stubs import StubSystem, last_user

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_new_tokens=8)


def requests(n, prefix="q"):
    return [Request(id=f"{prefix}{i}", messages=[{"role": "user", "content": f"{prefix} {i}"}]) for i in range(n)]


def echo(messages, params):
    return last_user(messages).upper()


def test_batches_and_order():
    system = StubSystem(echo)
    outs = run_requests(system, requests(5), GREEDY, batch_size=2)
    assert [o.text for o in outs] == [f"Q {i}" for i in range(5)]
    assert [len(c) for c in system.calls] == [2, 2, 1]
    assert all(o.ok and not o.cached for o in outs)


def test_cache_reuses_replies_and_keys_on_system_settings_and_prompt(tmp_path):
    path = tmp_path / "cache.jsonl"
    first = StubSystem(echo)
    run_requests(first, requests(4), GREEDY, cache=GenerationCache(path))
    assert first.n_rows == 4

    again = StubSystem(lambda m, p: "different")
    outs = run_requests(again, requests(4), GREEDY, cache=GenerationCache(path))
    assert again.n_rows == 0 and all(o.cached for o in outs)
    assert [o.text for o in outs] == [f"Q {i}" for i in range(4)]  # the cached replies, not the new system's

    run_requests(again, requests(4), SamplingParams(max_new_tokens=8, temperature=0.7, seed=1), cache=GenerationCache(path))
    assert again.n_rows == 4  # other sampling settings: other keys
    other = StubSystem(echo, spec="stub:b")
    run_requests(other, requests(5), GREEDY, cache=GenerationCache(path))
    assert other.n_rows == 5  # another system: other keys

    rec = json.loads(path.read_text().splitlines()[0])
    assert rec["system"] == "stub:a" and rec["sampling"]["max_new_tokens"] == 8 and rec["messages"][0]["content"] == "q 0"


def test_duplicate_prompts_are_generated_once():
    system = StubSystem(echo)
    reqs = [Request(id=str(i), messages=[{"role": "user", "content": "same"}]) for i in range(3)]
    outs = run_requests(system, reqs, GREEDY)
    assert system.n_rows == 1 and [o.text for o in outs] == ["SAME"] * 3 and [o.id for o in outs] == ["0", "1", "2"]


def test_partial_last_line_and_garbage_lines_are_ignored(tmp_path):
    path = tmp_path / "cache.jsonl"
    run_requests(StubSystem(echo), requests(3), GREEDY, cache=GenerationCache(path))
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n" + lines[2][:25])  # torn write at the end
    cache = GenerationCache(path)
    assert len(cache) == 2 and cache.n_ignored == 2
    assert path.read_text().endswith("\n")  # the torn tail was cut, so appends start on a fresh line
    system = StubSystem(echo)
    outs = run_requests(system, requests(3), GREEDY, cache=cache)
    assert system.n_rows == 1 and [o.cached for o in outs] == [True, True, False]
    for line in path.read_text().splitlines():
        if line != "not json":
            json.loads(line)
    assert len(GenerationCache(path)) == 3


CHILD = """
import sys, time
from pippin.engine.sampling import SamplingParams
from pippin.eval.runner import GenerationCache, run_requests
from tests.eval.stubs import StubSystem, last_user
from tests.eval.test_runner import requests

def slow(messages, params):
    time.sleep(0.15)
    return last_user(messages).upper()

run_requests(StubSystem(slow), requests(40), SamplingParams(max_new_tokens=8), cache=GenerationCache(sys.argv[1]), batch_size=2)
"""


def test_resume_after_kill(tmp_path):
    path = tmp_path / "cache.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not path.exists() or path.read_text().count("\n") < 6):
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    n_before = path.read_text().count("\n")
    assert 6 <= n_before < 40, "the child must be killed mid-run"
    with path.open("a") as f:
        f.write('{"key": "torn", "text": "half')  # as if the kill had landed inside a write
    cache = GenerationCache(path)
    assert len(cache) == n_before and cache.n_ignored == 1
    system = StubSystem(echo)
    outs = run_requests(system, requests(40), GREEDY, cache=cache, batch_size=2)
    assert system.n_rows == 40 - n_before  # only what was missing
    assert [o.text for o in outs] == [f"Q {i}" for i in range(40)]
    assert len(GenerationCache(path)) == 40


def test_unreachable_system_records_errors_that_are_retried_next_time(tmp_path):
    path = tmp_path / "cache.jsonl"
    down = StubSystem(echo, unreachable=True)
    outs = run_requests(down, requests(3), GREEDY, cache=GenerationCache(path), batch_size=2)
    assert [o.ok for o in outs] == [False] * 3 and all("unreachable" in o.error for o in outs)
    assert [len(c) for c in down.calls] == [2, 1]  # an endpoint error is not split into single rows
    assert all(json.loads(line)["error"] for line in path.read_text().splitlines())  # on record ...
    up = StubSystem(echo)
    outs = run_requests(up, requests(3), GREEDY, cache=GenerationCache(path))
    assert up.n_rows == 3 and all(o.ok for o in outs)  # ... but never served as replies


def test_a_failing_row_is_isolated():
    system = StubSystem(echo, fail=lambda m: last_user(m) == "q 2")
    outs = run_requests(system, requests(4), GREEDY, batch_size=4)
    assert [o.text for o in outs] == ["Q 0", "Q 1", None, "Q 3"]
    assert outs[2].error == "this prompt is too long"
