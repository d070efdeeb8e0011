"""Each CPU kernel against its PyTorch reference, and the FusedDecoder against the reference model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pippin.engine.engine import Engine
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.model.transformer import Block, Transformer
from tests.conftest import assert_fused_like_reference, fused_block_calls, tiny_model

pytestmark = pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable (no AVX2 or no compiler)")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-4), (torch.bfloat16, 1e-4)])
@pytest.mark.parametrize("m,n,k", [(1, 1536, 576), (3, 576, 1536), (8, 192, 576), (2, 7, 13), (1, 5, 40), (16, 33, 31)])
def test_gemv_matches_linear(dtype, tol, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    ref = F.linear(x, w.float())
    torch.testing.assert_close(ops().gemv(x, w), ref, atol=tol * k**0.5, rtol=1e-4)
    assert ops().gemv(x.view(m, 1, k), w).shape == (m, 1, n)


def test_rms_norm_silu_mul_rope():
    x, w = torch.randn(3, 5, 64), torch.rand(64) + 0.5
    torch.testing.assert_close(ops().rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5), atol=1e-5, rtol=1e-5)
    g, u = torch.randn(4, 100), torch.randn(4, 100)
    torch.testing.assert_close(ops().silu_mul(g, u), F.silu(g) * u, atol=1e-5, rtol=1e-5)
    from pippin.model.transformer import apply_rope, rope_tables

    cos, sin = rope_tables(16, 32, 10000.0)
    pos = torch.tensor([[3, 4], [7, 8]])
    qk = torch.randn(2, 2, 3 * 16)  # 3 heads of 16 per (b, t)
    ref = apply_rope(qk.view(2, 2, 3, 16).transpose(1, 2), cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)).transpose(1, 2)
    ops().rope_(qk, cos[pos], sin[pos], 3, 16)
    torch.testing.assert_close(qk.view(2, 2, 3, 16), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kv_heads,tied,shape", [(2, True, {}), (1, False, {}), (4, True, {}), (1, True, {"dim": 128, "n_heads": 2})])
def test_fused_decoder_generates_like_the_reference(kv_heads, tied, shape):
    # The last case has 64-wide heads, the size whose attention output the fused block keeps in registers.
    model = tiny_model(n_kv_heads=kv_heads, tie_embeddings=tied, **shape)
    before = {n: type(m) for n, m in model.named_modules()}
    prompts = [[1, 2, 3, 4], list(range(50, 70))]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for batch in ([prompts[0]], prompts):  # uniform and ragged positions (both on the fused step)
        ref = Engine(model, max_batch=2, max_len=64, kernels=False)
        fast = Engine(model, max_batch=2, max_len=64)
        assert fast.forward.fused
        assert fast.generate_ids(batch, params) == ref.generate_ids(batch, params)
    tokens = torch.randint(0, 256, (1, 12))
    dec = FusedDecoder.from_model(model)
    caches = [KVCache(model.config, batch_size=1, max_len=64) for _ in range(2)]
    for fwd, c in zip((model, dec), caches):
        prefill(fwd, tokens[:, :2], torch.tensor([2]), c)
    for t in range(2, 12):  # decode logits through the fused blocks, over contexts past 8 keys
        want = decode_step(model, tokens[:, t], caches[0])
        torch.testing.assert_close(decode_step(dec, tokens[:, t], caches[1]), want, atol=1e-4, rtol=1e-4)
    # The model itself is never changed: the same module classes (no class swapped in), and a decoder built from a
    # copy reads the copy's weights.
    assert {n: type(m) for n, m in model.named_modules()} == before and type(model.layers[0]) is Block
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.01)
    twin_dec = FusedDecoder.from_model(twin)
    caches = [KVCache(model.config, batch_size=1, max_len=64) for _ in range(2)]
    prefill(twin_dec, tokens[:, :2], torch.tensor([2]), caches[0])
    prefill(twin, tokens[:, :2], torch.tensor([2]), caches[1])
    for t in range(2, 6):
        want = decode_step(twin, tokens[:, t], caches[1])
        torch.testing.assert_close(decode_step(twin_dec, tokens[:, t], caches[0]), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_rows", [3, 9])  # 9: enough rows for the block's dense projections to take the GEMM
def test_fused_block_runs_ragged_rows_at_their_own_offsets(n_rows):
    """Rows at different offsets (prompts of different lengths, continuous batching) stay on the fused step."""
    model = tiny_model()
    prompts = [[1, 2, 3], list(range(50, 71)), [9] * 8, [7, 8], list(range(100, 110)), [4] * 5, [200] * 12, [30, 31, 32, 33], [66]][:n_rows]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = Engine(model, max_batch=n_rows, max_len=64, kernels=False).generate_ids(prompts, params)
    with fused_block_calls() as calls:
        fast = Engine(model, max_batch=n_rows, max_len=64).generate_ids(prompts, params)
    assert fast == ref
    assert calls.count(True) == 2 * 11  # both blocks at each of the 11 ragged decode steps (prefill is uniform but too big)


def test_fused_decoder_refuses_unknown_projection_modules():
    model = tiny_model()

    class Wrapped(torch.nn.Module):  # e.g. an adapter wrapper the kernels do not know: it changes the output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 1.5

    model.layers[0].self_attn.q_proj = Wrapped(model.layers[0].self_attn.q_proj)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    fast = Engine(model, max_len=32)
    assert not fast.forward.fused  # the whole model then runs as the reference
    assert fast.generate_ids([[3, 4, 5]], params) == Engine(model, max_len=32, kernels=False).generate_ids([[3, 4, 5]], params)


@pytest.mark.parametrize("kv8", [False, True])
def test_decode_plan_fused_step_equals_the_reference_for_ragged_rows_and_any_thread_count(kv8):
    """With one token per row the model-level plan runs every layer in one parallel region (phases split over the
    threads, barriers between them). It must equal the reference path with rows at their own offsets, and give the
    same logits on one thread as on several."""
    ref = tiny_model(seed=3)
    fast = FusedDecoder.from_model(ref)
    assert fast.plan.fused()
    lengths = torch.tensor([3, 9, 5])
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))

    def run(model) -> list[torch.Tensor]:  # noqa: ANN001
        cache = KVCache(ref.config, batch_size=3, max_len=32, kv8=kv8)
        out = [prefill(model, tokens[:, :9], lengths, cache)]
        for t in range(5):
            out.append(decode_step(model, tokens[torch.arange(3), lengths + t], cache))
        return out

    assert_fused_like_reference(run, ref, fast)


@pytest.mark.parametrize("kv8", [False, True])
def test_decode_plan_runs_the_first_rows_of_a_bigger_cache(kv8):
    """Continuous batching decodes the rows in use, a view over the first rows of a cache with room for more: the
    one-call step must take that view (it fell back to a call per block before) and equal the reference."""
    ref = tiny_model(seed=5)
    fast = FusedDecoder.from_model(ref)
    lengths = torch.tensor([4, 7])
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))

    def run(model, rows: int) -> list[torch.Tensor]:  # noqa: ANN001
        view = KVCache(ref.config, batch_size=rows, max_len=32, kv8=kv8).first_rows(2)
        out = [prefill(model, tokens[:, :7], lengths, view)]
        for t in range(4):
            out.append(decode_step(model, tokens[torch.arange(2), lengths + t], view))
        return out

    want = run(ref, 2)
    block_by_block = []
    real = Transformer.features

    def spy(self, tokens, **kw):  # noqa: ANN001, ANN202
        block_by_block.append(tokens.shape[1] == 1)
        return real(self, tokens, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Transformer, "features", spy)
        got = run(fast, 5)
    assert True not in block_by_block  # no decode step left the one-call plan
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_a_stale_build_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """torch's `lock` file outlives a build killed mid-way; loading must remove it rather than wait forever."""
    import os
    import shutil
    import subprocess
    import sys

    from pippin.kernels import build_dir

    home = tmp_path / "home"
    built = build_dir()
    shutil.copytree(built, home / "kernels" / built.name)  # copy2 keeps mtimes: ninja has nothing to rebuild
    (home / "kernels" / built.name / "lock").write_text("")  # what a build killed by SIGKILL leaves
    code = "from pippin.kernels import ops; import sys; sys.exit(0 if ops() is not None else 1)"
    env = {**os.environ, "PIPPIN_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (home / "kernels" / built.name / "lock").exists()
