"""Rotations folded into the weights (pippin.quant.rotate), down_proj's online input rotation (R4, a property of the
palettized layer) and sequential quantization (GPTQ order)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.errors import PippinError
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.quant.calibrate import BLOCK_GROUPS, input_second_moments, sequential_second_moments
from pippin.quant.compress import CompressConfig, apply_structure_, compress_, quantization_meta
from pippin.quant.linear import PalettizedLinear
from pippin.quant.palettize import fit_palette
from pippin.quant.rotate import HadamardTransform, RotatedHead, down_input_signs, hadamard, random_signs, rotate_, rotate_moment, rotation
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
    assert quantization_meta(report, cfg)["rotation"] == {"method": "hadamard", "seed": 0, "down_input": True}
    for i in range(2):  # R4: each down_proj stores W R with its own signs, and the checkpoint carries them
        name = f"layers.{i}.mlp.down_proj"
        signs = down_input_signs(name, 128, seed=0)
        assert torch.equal(model.get_submodule(name).in_signs, signs) and torch.equal(loaded.get_submodule(name).in_signs, signs)
        assert loaded.get_submodule(f"layers.{i}.mlp.up_proj").in_signs is None
    assert not torch.equal(model.layers[0].mlp.down_proj.in_signs, model.layers[1].mlp.down_proj.in_signs)
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
        if not act8:  # the R4 layers compute their dequantized weight (original basis): a dense copy gives the logits
            dense = tiny_model()
            dense.load_state_dict(model.state_dict(), strict=False)
            dense.lm_head = model.lm_head
            for name, m in model.named_modules():
                if isinstance(m, PalettizedLinear) and name.startswith("layers."):
                    dense.set_submodule(name, nn.Linear(m.in_features, m.out_features, bias=False))
                    dense.get_submodule(name).weight.copy_(m.dequantize())
            dense.embed_tokens = model.embed_tokens
            torch.testing.assert_close(dense(tokens), model(tokens), atol=1e-4, rtol=1e-4)
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


def test_rotated_second_moment_is_exact():
    """R4 needs no new calibration pass: the rotated input's second moment is R^T H R."""
    x = torch.randn(300, 96, dtype=torch.float64) * torch.linspace(0.1, 5, 96, dtype=torch.float64)  # outlier channels
    signs = random_signs(96, 4)
    h, r = x.T @ x / 300, rotation(signs)
    rotated = rotate_moment(h, HadamardTransform(signs))
    torch.testing.assert_close(rotated, (x @ r).T @ (x @ r) / 300, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(rotated, r.T @ h @ r, atol=1e-10, rtol=1e-10)
    assert rotated.diagonal().std() < 0.2 * h.diagonal().std()  # the point: the channels' energy is spread


@pytest.mark.parametrize("act8", [False, True])
def test_input_rotated_layer_computes_its_dequantized_weight(act8):
    """A layer that stores W' = W R: dequantize() is W' R^T (the input's own basis), and every forward path rotates x
    first (one and several rows: the LUT kernel or act8; 40 rows: the dense reference)."""
    signs = random_signs(128, 2)
    r = rotation(signs)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    lin = PalettizedLinear.from_palette(fit_palette((w.double() @ r).float(), bits=3, group_size=16), in_signs=signs)
    lin.act8 = act8
    torch.testing.assert_close(lin.dequantize().double(), lin.stored_weight().double() @ r.T, atol=1e-5, rtol=1e-5)
    assert (lin.dequantize() - w).norm() < 0.3 * w.norm()  # W's 3-bit approximation, in W's basis
    for rows in (1, 5, 40):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        want = lin._act8_reference((x.double() @ r).float()) if act8 else x @ lin.dequantize().T
        torch.testing.assert_close(lin(x), want, atol=1e-4, rtol=1e-4)
        # with gradients through x (an adapter below it in training), the PyTorch rotation
        torch.testing.assert_close(lin(x.clone().requires_grad_(True)), want, atol=1e-4, rtol=1e-4)
    assert lin.nbytes() == 32 * 128 * 3 // 8 + 2 * 8 * 2 + 128


@pytest.mark.parametrize("ffn_dim", [128, 80])
def test_r4_rotates_down_proj_where_the_width_allows_and_old_records_load_unrotated(ffn_dim):
    """No Hadamard matrix of order 80 is built in: that down_proj stays unrotated instead of failing. Without error
    feedback the rotated input's k-means importance comes from its full second moment. A record from before R4
    (no "down_input") rebuilds layers without the signs buffer; one with it, with."""
    model = tiny_model(ffn_dim=ffn_dim)
    plan = {f"layers.{i}.mlp.{n}": 4 for i in range(2) for n in ("up_proj", "down_proj")}
    compress_(model, CALIB, CompressConfig(plan=plan, rotate=True, error_feedback=False, seq_len=128, n_seqs=2))
    down = model.layers[1].mlp.down_proj
    assert (down.in_signs is not None) == (ffn_dim == 128)
    assert model.layers[1].mlp.up_proj.in_signs is None
    for record, rotated in (({"method": "hadamard", "seed": 0}, False), ({"method": "hadamard", "seed": 0, "down_input": True}, True)):
        shell = tiny_model(ffn_dim=ffn_dim)
        apply_structure_(shell, {"method": "palettize", "group_size": 16, "plan": plan, "rotation": record})
        assert (shell.layers[1].mlp.down_proj.in_signs is not None) == (rotated and ffn_dim == 128)
