"""Continuous batching on tiny models: requests that join mid-batch, mixed adapters, n samples, cancel, limits.

The reference is always the same request run alone through the Engine (greedy, or the same seed).
"""

from __future__ import annotations

import pytest
import torch

from pippin.adapters.peft_format import save_adapter
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.engine.scheduler import BatchScheduler, SchedulerFull
from pippin.errors import PippinError
from tests.adapters.test_lora import random_adapter, served
from tests.conftest import tiny_model


class Recorder:
    """A Sink that keeps every token and ending; `stop_after` ends a sample early (like a stop string)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.reasons: dict[int, str] = {}
        self.error: Exception | None = None
        self.stop_after = stop_after

    def token(self, index: int, token: int) -> bool:
        self.tokens.setdefault(index, []).append(token)
        return self.stop_after is None or len(self.tokens[index]) < self.stop_after

    def finish(self, index: int, reason: str) -> None:
        self.reasons[index] = reason

    def fail(self, error: Exception) -> None:
        self.error = error


def run_until_idle(s: BatchScheduler, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not s.has_work:
            return
        s.step()
    raise AssertionError("the scheduler did not drain")


def alone(engine: Engine, prompt: list[int], params: SamplingParams, adapter: str | None = None) -> list[int]:
    return engine.generate_ids([prompt], params, adapters=[adapter] if engine.adapters else None)[0]


def test_requests_joining_between_steps_equal_each_alone_with_mixed_adapters():
    model, store = served(n_slots=4)
    for i, n in enumerate(["a", "b"]):
        store.put(random_adapter(model, n, seed=i + 1))
    sched = BatchScheduler(model, max_batch=4, max_len=96, adapters=store)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (12, 5, 9, 14, 7)]
    prompts = [[5, 6, 7], list(range(20, 41)), [3], [40, 41, 42, 43], [9] * 11]
    names = ["a", None, "b", "a", None]
    recs = [Recorder() for _ in prompts]
    sched.submit(prompts[0], params[0], sink=recs[0], adapter=names[0])
    sched.submit(prompts[1], params[1], sink=recs[1], adapter=names[1])
    for _ in range(3):
        sched.step()
    assert sched.n_running == 2
    for i in (2, 3, 4):  # join a running batch at different positions; the 5th waits for a free row
        sched.submit(prompts[i], params[i], sink=recs[i], adapter=names[i])
    sched.step()
    assert sched.stats.last_batch == 4 and sched.n_waiting == 1
    run_until_idle(sched)
    ref = Engine(model, max_batch=1, max_len=96, adapters=store)
    for p, sp, n, r in zip(prompts, params, names, recs):
        assert r.tokens[0] == alone(ref, p, sp, n)
        assert r.reasons == {0: "length"}
    assert recs[0].tokens[0] != alone(ref, prompts[0], params[0], None)  # the adapters really change the output
    assert recs[2].tokens[0] != alone(ref, prompts[2], params[2], "a")
    assert sched.n_running == 0 and int(sched.lengths.sum()) == 0


def test_n_samples_share_one_prefill_and_follow_their_seeds():
    model = tiny_model()
    sched = BatchScheduler(model, max_batch=4, max_len=64)
    p = SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=11, ignore_eos=True)
    rec = Recorder()
    sched.submit([1, 2, 3, 4], p, sink=rec, n=3)
    run_until_idle(sched)
    assert sched.stats.prefills == 1
    ref = Engine(model, max_len=64)
    for k in range(3):  # sample k uses seed + k, exactly as that seed alone
        want = alone(ref, [1, 2, 3, 4], SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=11 + k, ignore_eos=True))
        assert rec.tokens[k] == want
    assert len({tuple(t) for t in rec.tokens.values()}) == 3


def test_stop_token_sink_stop_and_cancel_free_rows():
    model = tiny_model()
    ref = Engine(model, max_len=64)
    prompt = [100, 3, 77]
    full = alone(ref, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop_tok = next(t for i, t in enumerate(full) if i >= 2 and t not in full[:i])
    sched = BatchScheduler(model, max_batch=3, max_len=64, eos_ids=[stop_tok])
    eos, early, gone = Recorder(), Recorder(stop_after=3), Recorder()
    sched.submit(prompt, SamplingParams(max_new_tokens=12), sink=eos)
    sched.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), sink=early)
    t = sched.submit([1, 2], SamplingParams(max_new_tokens=50, ignore_eos=True), sink=gone)
    sched.step()
    sched.step()
    sched.cancel(t)
    sched.step()
    assert gone.reasons == {0: "cancelled"} and sched.rows[2] is None and int(sched.lengths[2]) == 0
    run_until_idle(sched)
    assert eos.tokens[0] == full[: full.index(stop_tok)] and eos.reasons == {0: "stop"}
    assert early.tokens[0] == full[:3] and early.reasons == {0: "stop"}
    assert all(r is None for r in sched.rows)


def test_capacity_and_impossible_requests_are_refused_up_front():
    model = tiny_model()
    sched = BatchScheduler(model, max_batch=2, max_len=32, max_queue=1)
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(PippinError, match="context"):
        sched.submit(list(range(30)), p, sink=Recorder())
    with pytest.raises(PippinError, match="n must be"):
        sched.submit([1], p, sink=Recorder(), n=3)
    with pytest.raises(PippinError, match="empty"):
        sched.submit([], p, sink=Recorder())
    sched.submit([1], p, sink=Recorder(), n=2)
    sched.submit([2], p, sink=Recorder())
    with pytest.raises(SchedulerFull):
        sched.submit([3], p, sink=Recorder())
    run_until_idle(sched)
    sched.submit([3], p, sink=Recorder())  # capacity comes back once rows are freed


def test_more_adapters_than_slots_wait_and_a_broken_adapter_fails_alone(tmp_path):
    model, store = served(n_slots=3)  # two adapter slots
    store.root = tmp_path
    for i, n in enumerate(["a", "b", "c"]):
        save_adapter(random_adapter(model, n, seed=i + 1), tmp_path / n)
    save_adapter(random_adapter(model, "bad", seed=9), tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    sched = BatchScheduler(model, max_batch=4, max_len=64, adapters=store)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    recs = {n: Recorder() for n in ["a", "b", "c", "bad"]}
    for n, r in recs.items():
        sched.submit([4, 5, 6], params, sink=r, adapter=n)
    sched.step()
    assert sched.n_running == 2  # "c" must wait for a slot; "bad" waits behind it
    run_until_idle(sched)
    ref = Engine(model, max_len=64, adapters=store)
    for n in ["a", "b", "c"]:
        assert recs[n].tokens[0] == alone(ref, [4, 5, 6], params, n), n
    assert isinstance(recs["bad"].error, PippinError) and not recs["bad"].tokens
    with pytest.raises(PippinError, match="Unknown adapter"):
        sched.submit([1], params, sink=Recorder(), adapter="nope")


def test_a_raising_sink_cancels_only_its_request():
    model = tiny_model()
    sched = BatchScheduler(model, max_batch=2, max_len=64)

    class Broken(Recorder):
        def token(self, index, token):
            raise RuntimeError("client bug")

    ok, bad = Recorder(), Broken()
    sched.submit([1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=True), sink=ok)
    sched.submit([1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=True), sink=bad)
    run_until_idle(sched)
    assert len(ok.tokens[0]) == 6 and bad.reasons == {0: "cancelled"}
    assert torch.equal(sched.lengths, torch.zeros(2, dtype=torch.long))


def test_a_request_whose_sampling_fails_fails_alone(monkeypatch):
    import pippin.engine.scheduler as sched_mod

    model = tiny_model()
    sched = BatchScheduler(model, max_batch=2, max_len=64)
    ok, bad = Recorder(), Recorder()
    sched.submit([1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=True), sink=ok)
    sched.step()
    real = sched_mod.sample

    def flaky(logits, params, **kw):  # the sampler breaks for this one request's settings only
        if params.temperature == 0.7:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, params, **kw)

    monkeypatch.setattr(sched_mod, "sample", flaky)
    sched.submit([4, 5], SamplingParams(max_new_tokens=6, temperature=0.7, ignore_eos=True), sink=bad)
    run_until_idle(sched)
    assert isinstance(bad.error, PippinError) and "Sampling failed" in str(bad.error)
    assert len(ok.tokens[0]) == 6 and ok.reasons == {0: "length"}


def test_warm_up_leaves_no_trace():
    """The server warms each model up with one short request: afterwards no row is taken, the stats start from zero,
    and the next request is exactly what it would have been."""
    model = tiny_model(seed=8)
    sched = BatchScheduler(model, max_batch=2, max_len=64)
    sched.warm_up([4, 5, 6, 7], steps=3)
    assert not sched.has_work and sched.stats.steps == 0 and sched.stats.prefills == 0 and int(sched.lengths.sum()) == 0
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    rec = Recorder()
    sched.submit([9, 8, 7], params, sink=rec)
    run_until_idle(sched)
    assert rec.tokens[0] == alone(Engine(model, max_len=64), [9, 8, 7], params)
    sched.submit([1, 2], params, sink=Recorder())
    with pytest.raises(PippinError, match="before any request"):
        sched.warm_up([4, 5])


def test_a_request_needing_more_rows_is_not_overtaken_forever():
    """An n=2 request waits while single-row requests keep arriving; without aging each freed row went to the newest
    arrival and the n=2 request never saw two free rows at once. After max_overtakes admissions pass it, rows drain."""
    sched = BatchScheduler(tiny_model(seed=9), max_batch=2, max_len=64, max_queue=64, max_overtakes=3)
    short = SamplingParams(max_new_tokens=3, ignore_eos=True)
    sched.submit([1, 2], SamplingParams(max_new_tokens=5, ignore_eos=True), sink=Recorder())
    sched.step()
    wide = Recorder()
    sched.submit([3, 4], short, sink=wide, n=2)
    for step in range(80):
        if sched.n_waiting < 4:  # a steady stream of one-row requests: one always waits
            sched.submit([5, 6, step % 50 + 7], short, sink=Recorder())
        sched.step()
        if wide.reasons:
            break
    assert wide.reasons == {0: "length", 1: "length"}, "the two-row request was starved"


def test_a_prefill_that_raises_fails_its_request_only(monkeypatch):
    """A bug in one request's prefill (not a PippinError) fails that request; the running rows, and a request prefilled
    in the same batch, go on undisturbed."""
    import pippin.engine.scheduler as sched_mod

    model = tiny_model(seed=10)
    sched = BatchScheduler(model, max_batch=3, max_len=64)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ok = Recorder()
    sched.submit([7, 8, 9], params, sink=ok)
    sched.step()
    real = sched_mod.prefill

    def prefill(m, tokens, lengths, cache, **kw):  # noqa: ANN001, ANN202
        if tokens.shape[1] == 4:
            raise RuntimeError("boom")
        return real(m, tokens, lengths, cache, **kw)

    monkeypatch.setattr(sched_mod, "prefill", prefill)
    bad, neighbour = Recorder(), Recorder()
    sched.submit_many([([1, 2, 3, 4], params, None, 1, bad), ([5, 6], params, None, 1, neighbour)])
    run_until_idle(sched)
    assert isinstance(bad.error, RuntimeError) and not bad.tokens
    assert ok.error is None and ok.tokens[0] == alone(Engine(model, max_len=64), [7, 8, 9], params)
    assert neighbour.error is None and neighbour.tokens[0] == alone(Engine(model, max_len=64), [5, 6], params)


@pytest.mark.parametrize("kv8", [False, True])
def test_long_prompts_prefill_together_in_chunks_while_other_rows_decode(kv8):
    """Waiting prompts are prefilled as one batch in rows that are not neighbours, at most `prefill_chunk` tokens per step,
    and a running row gains a token at every one of those steps; every reply equals greedy decoding without a cache."""
    from tests.engine.test_engine import greedy_reference

    model = tiny_model(seed=4)
    sched = BatchScheduler(model, max_batch=4, max_len=128, prefill_chunk=16, kv8=kv8)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    short, gap, keep = Recorder(), Recorder(), Recorder()
    sched.submit_many([([3, 4, 5], params, None, 1, short), ([9, 9], params, None, 1, gap), ([7, 7, 7], params, None, 1, keep)])
    sched.step()
    sched.cancel(sched.rows[1].ticket)  # row 1 frees: the next two prompts land in rows 1 and 3
    sched.step()
    prompts = [list(range(10, 20)), list(range(50, 80))]
    longs = [Recorder(), Recorder()]
    sched.submit_many([(prompts[0], params, None, 1, longs[0]), (prompts[1], params, None, 1, longs[1])])
    before = len(short.tokens[0])
    gathered = []
    real_gather = sched.cache.gather
    sched.cache.gather = lambda rows: gathered.append(rows) or real_gather(rows)
    for k in range(2):  # 40 prompt tokens, 16 per step (10 + 6 together, then 16, then 8), each step also decodes
        sched.step()
        assert len(short.tokens[0]) == before + k + 1 and not longs[1].tokens
    assert gathered[:2] == [[1, 3], [3]]
    run_until_idle(sched)
    if not kv8:  # an 8-bit cache rounds keys and values: the oracle is then the same request alone
        assert short.tokens[0] == greedy_reference(model, [3, 4, 5], 10)
        for p, rec in zip(prompts, longs):
            assert rec.tokens[0] == greedy_reference(model, p, 10)
    else:
        for p, rec in zip(prompts, longs):
            assert rec.tokens[0] == alone(Engine(model, max_len=128, kv8=True), p, params)


def test_deadlines_fail_waiting_requests_and_end_running_ones():
    """Past its deadline a request still waiting for a row fails (DeadlineExceeded); a running one ends with the
    tokens it has ('length'), and its row serves the next request."""
    import time

    from pippin.engine.scheduler import DeadlineExceeded

    sched = BatchScheduler(tiny_model(seed=2), max_batch=1, max_len=64, max_queue=2)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    running, waiting, later = Recorder(), Recorder(), Recorder()
    [ticket] = sched.submit_many([([1, 2, 3], params, None, 1, running)], deadline=time.monotonic() + 60)
    sched.step()
    sched.submit_many([([4, 5], params, None, 1, waiting)], deadline=time.monotonic() - 1)  # already late, no free row
    sched.step()
    sched.step()
    assert isinstance(waiting.error, DeadlineExceeded) and not waiting.tokens
    n = len(running.tokens[0])
    ticket.deadline = time.monotonic() - 1
    sched.submit([6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True), sink=later)
    run_until_idle(sched)
    assert running.reasons == {0: "length"} and len(running.tokens[0]) == n < 30
    assert later.reasons == {0: "length"} and len(later.tokens[0]) == 3


@pytest.mark.parametrize("kv8", [False, True])
def test_reuse_prefix_prefills_only_what_no_row_holds_and_equals_a_full_prefill(kv8):
    """reuse_prefix: a chat's next turn (the prompt, its reply, a new message) prefills only its new tokens. The row it
    comes from kept its slots while it rode along as a dummy under another row's decoding; a prefix held by another
    row is copied into the new one. Every reply equals the same request on a scheduler that prefills everything."""
    model = tiny_model(seed=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ref = BatchScheduler(model, max_batch=4, max_len=128, kv8=kv8)
    sched = BatchScheduler(model, max_batch=4, max_len=128, kv8=kv8, reuse_prefix=True)

    def run(s: BatchScheduler, prompt: list[int]) -> list[int]:
        rec = Recorder()
        s.submit(prompt, params, sink=rec)
        run_until_idle(s)
        return rec.tokens[0]

    first, a, b = [3, 4, 5, 6, 7], Recorder(), Recorder()
    sched.submit(first, params, sink=a)
    sched.submit([9, 9], SamplingParams(max_new_tokens=20, ignore_eos=True), sink=b)
    sched.step()
    while sched.rows[0] is not None:
        sched.step()
    n_held = len(first) + 7  # the last reply token was sampled, never fed
    held = [t[:, 0, :, :n_held].clone() for t in sched.cache._buffers()]
    for _ in range(5):  # row 1 decodes, row 0 rides along as a dummy
        sched.step()
    assert sched.rows[1] is not None and int(sched.lengths[0]) == n_held
    assert all(torch.equal(t[:, 0, :, :n_held], h) for t, h in zip(sched.cache._buffers(), held))
    run_until_idle(sched)
    assert sched.stats.reused_tokens == 0 and a.tokens[0] == run(ref, first)

    turn2 = first + a.tokens[0] + [11, 12]
    assert run(sched, turn2) == run(ref, turn2)
    assert sched.stats.reused_tokens == n_held
    other = [9, 9] + b.tokens[0][:3] + [1]  # row 1's prefix, started in row 0: copied across
    assert run(sched, other) == run(ref, other)
    assert sched.stats.reused_tokens == n_held + 5
    same = list(other)  # the whole prompt is held: its last token is still prefilled, for the first sample's logits
    assert run(sched, same) == run(ref, same)
    assert sched.stats.reused_tokens == n_held + 5 + len(same) - 1


def test_reuse_prefix_never_crosses_adapters_and_forgets_one_adapter():
    model, store = served(n_slots=3)
    store.put(random_adapter(model, "a", seed=1))
    sched = BatchScheduler(model, max_batch=2, max_len=64, adapters=store, reuse_prefix=True)
    ref = Engine(model, max_batch=1, max_len=64, adapters=store)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    # row 0 takes each request; the prefix it held moves up to row 1 while that holds none or an older one
    for adapter, reused in ((None, 0), ("a", 0), ("a", 4), (None, 4), ("a", 0)):
        rec = Recorder()
        before = sched.stats.reused_tokens
        sched.submit(prompt, params, sink=rec, adapter=adapter)
        run_until_idle(sched)
        assert sched.stats.reused_tokens - before == reused
        assert rec.tokens[0] == alone(ref, prompt, params, adapter)
    assert [h[0] for h in sched._kept] == ["a", None]
    sched.forget_prefixes("a")
    assert [h and h[0] for h in sched._kept] == [None, None] and sched._kept[1] is not None and int(sched.lengths[0]) == 0
    sched.fail_running(PippinError("test"))  # after a failed step nothing is kept
    assert sched._kept == [None, None] and int(sched.lengths.sum()) == 0
