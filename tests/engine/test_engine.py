"""Engine logic on tiny models: cached decode vs full forward, ragged batches, sampling, stops, limits."""

import pytest
import torch

from pippin.engine.engine import Engine
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams, filter_logits, sample
from pippin.errors import PippinError
from tests.conftest import tiny_model


def greedy_reference(model, prompt, n):
    """Greedy decoding by re-running the full forward pass every step (no cache): the slow oracle."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cached_decode_equals_full_forward(kv_heads):
    model = tiny_model(n_kv_heads=kv_heads)
    cache = KVCache(model.config, batch_size=1, max_len=64)
    tokens = torch.randint(0, 256, (1, 30))
    logits = prefill(model, tokens[:, :10], torch.tensor([10]), cache)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(logits, full[:, 9], atol=1e-5, rtol=1e-5)
    for t in range(10, 30):
        logits = decode_step(model, tokens[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)
    assert int(cache.lengths[0]) == 30


def test_prefill_continuing_from_cache_uses_position_mask():
    model = tiny_model()
    cache = KVCache(model.config, batch_size=1, max_len=64)
    tokens = torch.randint(0, 256, (1, 24))
    prefill(model, tokens[:, :8], torch.tensor([8]), cache)
    logits = prefill(model, tokens[:, 8:], torch.tensor([16]), cache, start=8)  # a second turn
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_each_row_alone():
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=128)
    prompts = [[5, 6, 7], list(range(20, 40)), [100] * 9]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = engine.generate_ids(prompts, params)
    for p, got in zip(prompts, batched):
        assert got == greedy_reference(model, p, 12)


def test_stop_token_ends_generation_and_is_not_returned():
    model = tiny_model()
    ref = greedy_reference(model, [1, 2, 3], 10)
    stop = ref[4]
    engine = Engine(model, max_len=64)
    engine.eos_ids = [stop]
    out = engine.generate_ids([[1, 2, 3]], SamplingParams(max_new_tokens=10))
    assert out[0] == ref[: ref.index(stop)]
    assert engine.last_stats.finish_reasons == ["stop"]


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    model = tiny_model()
    engine = Engine(model, max_len=64)
    p = SamplingParams(max_new_tokens=20, temperature=1.5, seed=7, ignore_eos=True)
    a = engine.generate_ids([[1, 2, 3]], p)
    b = engine.generate_ids([[1, 2, 3]], p)
    c = engine.generate_ids([[1, 2, 3]], SamplingParams(max_new_tokens=20, temperature=1.5, seed=8, ignore_eos=True))
    assert a == b and a != c


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 so the second token is needed
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(min_p=0.35) == [True, True, False, False]  # 0.15 < 0.35 * 0.5
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), generator=g)) for _ in range(200)}
    assert draws == {0, 1}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    assert int(sample(logits, params, history=torch.tensor([[0]]))) == 1
    assert int(sample(logits, params, history=torch.tensor([[1]]))) == 0


def test_limits_give_clear_errors():
    model = tiny_model()
    engine = Engine(model, max_len=32)
    with pytest.raises(PippinError, match="exceeds the context of 32"):
        list(engine.generate([list(range(30))], SamplingParams(max_new_tokens=5)))
    with pytest.raises(PippinError, match="empty"):
        list(engine.generate([[]], SamplingParams()))
    with pytest.raises(PippinError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(PippinError, match="temperature"):
        SamplingParams(temperature=-1)


def test_cache_clone_rows_shares_prefill():
    model = tiny_model()
    cache = KVCache(model.config, batch_size=1, max_len=32)
    tokens = torch.randint(0, 256, (1, 6))
    prefill(model, tokens, torch.tensor([6]), cache)
    twins = cache.clone_rows(0, 3)
    out = decode_step(model, torch.tensor([9, 9, 9]), twins)
    ref = decode_step(model, torch.tensor([9]), cache)
    torch.testing.assert_close(out, ref.expand(3, -1), atol=1e-5, rtol=1e-5)
