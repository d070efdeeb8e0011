"""Rotations folded into the weights (pippin.quant.rotate) and sequential quantization (GPTQ order)."""

from __future__ import annotations

import pytest
import torch

from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.errors import PippinError
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.quant.calibrate import BLOCK_GROUPS, input_second_moments, sequential_second_moments
from pippin.quant.compress import CompressConfig, compress_, quantization_meta
from pippin.quant.linear import PalettizedLinear
from pippin.quant.palettize import fit_palette
from pippin.quant.rotate import RotatedHead, hadamard, rotate_
from tests.conftest import tiny_model

CALIB = list(torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(1)).tolist())


@pytest.mark.parametrize("n", [1, 2, 12, 16, 24, 64, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_refuses_orders_it_cannot_build():
    with pytest.raises(PippinError, match="order 36"):
        hadamard(36)


def test_rotation_folding_is_exact_in_fp32():
    model, ref = tiny_model(), tiny_model()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        before = ref(tokens)
        head = rotate_(model, seed=3)
        after = model(tokens)
    assert isinstance(model.lm_head, RotatedHead) and head is model.lm_head
    assert all(torch.equal(b.input_layernorm.weight, torch.ones(64)) for b in model.layers)
    assert not torch.allclose(model.layers[0].self_attn.q_proj.weight, ref.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # Cached decode still equals the full forward (v is rotated per head in the cache, k is not).
    cache = KVCache(model.config, batch_size=1, max_len=32)
    with torch.no_grad():
        prefill(model, tokens[:1, :10], torch.tensor([10]), cache)
        for t in range(10, 14):
            torch.testing.assert_close(decode_step(model, tokens[:1, t], cache), before[:1, t], atol=1e-4, rtol=1e-4)


def test_rotation_refuses_models_it_cannot_rotate():
    with pytest.raises(PippinError, match="QK-norm"):
        rotate_(tiny_model(qk_norm=True))
    with pytest.raises(PippinError, match="tied"):
        rotate_(tiny_model(tie_embeddings=False))
    model = tiny_model()
    compress_(model, CALIB, CompressConfig(plan={"layers.0.mlp.up_proj": 4}, seq_len=128, n_seqs=2))
    with pytest.raises(PippinError, match="already compressed"):
        rotate_(model)


def test_sequential_moments_are_measured_on_the_model_as_quantized_so_far():
    """Each group's E[x x^T] is that of the final model (only earlier modules change a group's inputs), and not the
    full-precision model's once earlier layers are quantized."""
    model, ref = tiny_model(), tiny_model()
    seqs = torch.tensor(CALIB[:512]).view(4, 128)
    yielded = {}
    for group, H in sequential_second_moments(model, seqs, head="lm_head", chunk=3):
        yielded[group] = H
        for name in group:
            if name != "lm_head":
                w = model.get_submodule(name).weight
                model.set_submodule(name, PalettizedLinear.from_palette(fit_palette(w, bits=2, group_size=16)))
    expected = [tuple(f"layers.{i}.{g}" for g in group) for i in range(2) for group in BLOCK_GROUPS] + [("lm_head",)]
    assert list(yielded) == expected
    names = [g[0] for g in expected]
    final = input_second_moments(model, list(seqs), names)
    full = input_second_moments(ref, list(seqs), names)
    for group, H in yielded.items():
        torch.testing.assert_close(H, final[group[0]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yielded[expected[0]], full[names[0]], rtol=1e-5, atol=1e-6)  # nothing before it changed
    assert not torch.allclose(yielded[("lm_head",)], full["lm_head"], rtol=1e-2)


@pytest.mark.parametrize("act8", [False, True])
def test_rotated_sequential_model_reloads_decodes_fused_and_is_reproducible(tmp_path, act8):
    from pippin.adapters.lora import base_fingerprint
    from pippin.api import load_any
    from pippin.model.checkpoint import LoadedModel, save_pippin

    cfg = CompressConfig(bpw=3.5, embed_bits=4, rotate=True, sequential=True, act8=act8, seq_len=128, n_seqs=2, hessian_seqs=4)
    model, twin, other = tiny_model(), tiny_model(), tiny_model()
    report = compress_(model, CALIB, cfg)
    compress_(twin, CALIB, cfg)
    compress_(other, CALIB, CompressConfig(**{**cfg.__dict__, "rotate_seed": 1}))
    assert base_fingerprint(model) == base_fingerprint(twin) != base_fingerprint(other)
    save_pippin(
        LoadedModel(model=model, tokenizer=None, path=tmp_path, meta={}),
        tmp_path / "ck",
        extra_meta={"quantization": quantization_meta(report, cfg)},
    )
    loaded = load_any(tmp_path / "ck").model
    assert isinstance(loaded.lm_head, RotatedHead)
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    if ops() is None:
        return
    fused = FusedDecoder.from_model(loaded)
    cache = {k: KVCache(loaded.config, batch_size=1, max_len=32) for k in ("fused", "model")}
    with torch.no_grad():
        for name, fwd in (("fused", fused), ("model", loaded)):
            prefill(fwd, tokens[:, :8], torch.tensor([8]), cache[name])
        for t in range(8, 12):
            a, b = (decode_step(f, tokens[:, t], cache[n]) for n, f in (("fused", fused), ("model", loaded)))
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
