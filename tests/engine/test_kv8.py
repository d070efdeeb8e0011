"""The 8-bit KV cache: quantization error bounds, memory, generation close to fp32 and independent of batching,
row copies that carry the scales, and the fused kernel blocks writing and reading the int8 cache like the reference."""

import pytest
import torch

from pippin.engine.engine import Engine
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache, dequantize_kv, quantize_kv
from pippin.engine.sampling import SamplingParams
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from tests.conftest import fused_block_calls, tiny_model


def test_quantize_kv_error_is_at_most_half_a_step():
    x = torch.randn(2, 3, 5, 64) * torch.rand(2, 3, 5, 1) * 10
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 5)
    err = (dequantize_kv(q, scale) - x).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-6).all())
    assert int(q.abs().amax()) == 127  # absmax maps to the full range
    zero_q, zero_s = quantize_kv(torch.zeros(1, 1, 1, 8))  # an all-zero vector stays zero, no NaN
    assert torch.equal(dequantize_kv(zero_q, zero_s), torch.zeros(1, 1, 1, 8))


def test_kv8_memory_is_a_quarter_plus_the_scales():
    cfg = tiny_model().config
    fp32 = KVCache(cfg, batch_size=2, max_len=64)
    kv8 = KVCache(cfg, batch_size=2, max_len=64, kv8=True)
    assert kv8.nbytes == fp32.nbytes // 4 + fp32.nbytes // cfg.head_dim
    assert kv8.kv8 and not fp32.kv8


def test_kv8_logits_stay_close_to_fp32():
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    out = {}
    for kv8 in (False, True):
        cache = KVCache(model.config, batch_size=1, max_len=64, kv8=kv8)
        prefill(model, tokens[:, :32], torch.tensor([32]), cache)
        out[kv8] = torch.stack([decode_step(model, tokens[:, t], cache)[0] for t in range(32, 40)])
    rel = (out[True] - out[False]).norm() / out[False].norm()
    assert 0 < rel < 0.02  # quantized (not identical) but close
    assert (out[True].argmax(-1) == out[False].argmax(-1)).float().mean() >= 0.75


def test_kv8_generation_does_not_depend_on_batching():
    model = tiny_model()
    prompts = [[5, 6, 7], list(range(20, 40)), [100] * 9]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batched = Engine(model, max_batch=3, max_len=64, kv8=True).generate_ids(prompts, params)
    alone = [Engine(model, max_len=64, kv8=True).generate_ids([p], params)[0] for p in prompts]
    assert batched == alone


def test_kv8_row_copies_carry_the_scales():
    cfg = tiny_model().config
    cache = KVCache(cfg, batch_size=3, max_len=16, kv8=True)
    cache.k_scale[:, 0, :, :4] = 2.0
    cache.k[:, 0, :, :4] = 5
    cache.copy_row(0, 2, 4)
    assert bool((cache.k_scale[:, 2, :, :4] == 2.0).all()) and bool((cache.k[:, 2, :, :4] == 5).all())
    cache.lengths[0] = 4
    for other in (cache.clone_rows(0, 2), cache.branch(0, 2, 3)):
        assert other.kv8 and bool((other.k_scale[:, 1, :, :4] == 2.0).all())


@pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable")
def test_kernel_model_with_kv8_matches_the_reference_path():
    ref, fast = tiny_model(), tiny_model()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    want = Engine(ref, max_batch=2, max_len=64, kv8=True, kernels=False).generate_ids(prompts, params)
    with fused_block_calls() as calls:  # the fused blocks write and read the int8 cache themselves
        assert Engine(fast, max_batch=2, max_len=64, kv8=True).generate_ids(prompts, params) == want
    assert calls == [False] * 2 + [True] * 2 * 7  # both blocks: the prefill (uniform), then 7 ragged decode steps
    # Step by step, through the whole-model plan: the same logits, and the cache holds the same int8 entries.
    tokens = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(2))
    fast = FusedDecoder.from_model(fast)
    caches = [KVCache(ref.config, batch_size=1, max_len=32, kv8=True) for _ in range(2)]
    for m, c in zip((ref, fast), caches):
        prefill(m, tokens[:, :3], torch.tensor([3]), c)
    for t in range(3, 14):
        got, want = decode_step(fast, tokens[:, t], caches[1]), decode_step(ref, tokens[:, t], caches[0])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (caches[0].k.int() - caches[1].k.int()).abs().max() <= 1 and (caches[0].v.int() - caches[1].v.int()).abs().max() <= 1
    torch.testing.assert_close(caches[1].k_scale, caches[0].k_scale, atol=1e-6, rtol=1e-5)
