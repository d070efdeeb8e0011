"""Compression: packing, k-means LUTs, the LUT kernel against dequantize + F.linear, the bit allocator,
the compressed model in the engine, and the compressed checkpoint format."""

import json

import pytest
import torch
import torch.nn.functional as F

from pippin.engine.engine import Engine
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.quant.allocate import LayerChoice, allocate
from pippin.quant.compress import CompressConfig, compress_, quantization_meta, stored_bits
from pippin.quant.linear import Int8Embedding, Int8TiedHead, PalettizedLinear
from pippin.quant.pack import SUPPORTED_BITS, pack, unpack
from pippin.quant.palettize import Palette, error_feedback, fit_palette, output_error
from tests.conftest import fused_block_calls, kernel_variants, tiny_model, use_variant

CALIB = list(range(3, 250)) * 4  # 988 tokens of "text" for the tiny 256-token vocabulary


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_unpack_identity(bits):
    idx = torch.randint(0, 2**bits, (24, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack(idx, bits)
    assert packed.shape == (24, 40 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits, 40), idx)


def test_kmeans_error_shrinks_with_bits_and_keeps_outliers():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w[3, 7] = 12.0  # an outlier weight, as LLMs have
    errs = []
    for b in SUPPORTED_BITS:
        p = fit_palette(w, bits=b, group_size=16)
        assert p.lut.shape == (4, 2**b) and p.lut.dtype == torch.float16
        errs.append(float(((p.dequantize() - w) ** 2).mean()))
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4
    assert abs(float(fit_palette(w, bits=4).dequantize()[3, 7]) - 12.0) < 0.5


def test_importance_weighting_lowers_weighted_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    imp = torch.ones(64)
    imp[:8] = 100.0  # the first input channels matter far more

    def weighted_err(p):
        return float((((p.dequantize() - w) ** 2) * imp).sum())

    assert weighted_err(fit_palette(w, bits=2, importance=imp)) < weighted_err(fit_palette(w, bits=2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_feedback_lowers_output_error_with_the_same_luts(bits):
    g = torch.Generator().manual_seed(bits)
    mix = torch.randn(48, 48, generator=g)
    x = torch.randn(2000, 48, generator=g) @ mix  # correlated inputs, as a transformer's are
    x[:, 5] = 0  # an input the calibration never excites
    H = x.T @ x / len(x)
    w = torch.randn(32, 48, generator=g)
    nearest = fit_palette(w, bits=bits, group_size=16, importance=H.diagonal())
    fed = error_feedback(w, nearest, H)
    assert torch.equal(fed.lut, nearest.lut) and fed.idx.shape == w.shape
    assert int(fed.idx.min()) >= 0 and int(fed.idx.max()) < 2**bits
    # Real inputs: the output error drops (by a lot), though the plain weight error rises.
    out_err = [float(((x @ (p.dequantize() - w).T) ** 2).mean()) for p in (nearest, fed)]
    assert out_err[1] < 0.8 * out_err[0]
    assert float(((fed.dequantize() - w) ** 2).sum()) > float(((nearest.dequantize() - w) ** 2).sum())
    assert float(output_error(w, fed, H).sum()) / w.shape[0] == pytest.approx(out_err[1], rel=1e-3)
    with pytest.raises(ValueError, match="expected"):
        error_feedback(w, nearest, H[:40, :40])


def test_row_scales_lower_the_output_error_and_are_least_squares_after_error_feedback():
    # Rows of one LUT group that differ in norm by 30x (as a rotation leaves them): one shared LUT wastes its entries
    # on the largest rows, unit-RMS rows with an fp16 scale each do not.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = x.T @ x / len(x)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-1.5, 0, 32)[torch.randperm(32, generator=g), None]
    plain = error_feedback(w, fit_palette(w, bits=3, importance=H.diagonal()), H)
    fitted = fit_palette(w, bits=3, importance=H.diagonal(), row_scale=True)
    assert fitted.row_scale.dtype == torch.float16
    torch.testing.assert_close(fitted.row_scale.float(), w.pow(2).mean(1).sqrt(), rtol=1e-3, atol=0)  # RMS before EF
    scaled = error_feedback(w, fitted, H)
    assert torch.equal(scaled.lut, fitted.lut)
    torch.testing.assert_close(scaled.dequantize(), scaled.unscaled() * scaled.row_scale.float()[:, None])
    assert float(output_error(w, scaled, H).sum()) < 0.6 * float(output_error(w, plain, H).sum())
    # After error feedback each row's scale minimises its output error for the chosen indices: moving it 1 % either
    # way (20x fp16's step here) costs more.
    base = output_error(w, scaled, H)
    for f in (0.99, 1.01):
        moved = Palette(idx=scaled.idx, lut=scaled.lut, bits=3, group_size=16, row_scale=(scaled.row_scale.float() * f).half())
        assert bool((output_error(w, moved, H) > base).all())


def test_compress_with_error_feedback_lands_closer_to_the_original_model():
    x = torch.tensor([CALIB[:64]])
    with torch.no_grad():
        ref = tiny_model()(x)
    rel, dist = {}, {}
    for fb in (False, True):
        model = tiny_model()
        rel[fb] = compress_(model, CALIB, CompressConfig(bpw=8, candidate_bits=(2,), error_feedback=fb)).layers
        with torch.no_grad():
            dist[fb] = float(((model(x) - ref) ** 2).mean())
    assert all("rel_output_error" not in r for r in rel[False]) and all("rel_output_error" in r for r in rel[True])
    # The same LUTs, re-chosen indices: a larger weight error, for logits closer to the uncompressed model's.
    assert sum(r["rel_error"] for r in rel[True]) > sum(r["rel_error"] for r in rel[False])
    assert dist[True] < dist[False]


@pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable")
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("m,n,k,group", [(1, 96, 136, 16), (3, 32, 576, 16), (16, 48, 8, 4), (2, 7, 24, 1)])
@pytest.mark.parametrize("row_scale", [False, True])
def test_lut_kernel_matches_dequantize_linear(bits, m, n, k, group, row_scale):
    g = torch.Generator().manual_seed(bits * 100 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    p = fit_palette(w, bits=bits, group_size=group, row_scale=row_scale)
    lin = PalettizedLinear.from_palette(p)
    assert (lin.row_scale is not None) == row_scale
    ref = F.linear(x, lin.dequantize())
    torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)  # the kernel (m <= 16 rows)
    assert torch.equal(lin.dequantize(), p.dequantize())
    assert torch.equal(ops().lut_dequant(lin.packed, lin.lut, bits, group), p.unscaled())


def test_int8_embedding_and_head():
    w = torch.randn(51, 32)  # odd: the two-rows-at-a-time decode loop has a tail
    q = Int8Embedding.from_float(w)
    assert (q.dequantize() - w).abs().max() <= w.abs().amax(1).max() / 127
    tokens = torch.tensor([[3, 49, 0]])
    torch.testing.assert_close(q(tokens), q.dequantize()[tokens])
    x = torch.randn(2, 32)
    torch.testing.assert_close(Int8TiedHead(q)(x), F.linear(x, q.dequantize()), atol=1e-4, rtol=1e-4)
    # act8: int8 activations times the int8 rows; the kernel (few rows) equals the reference (many rows) row by row.
    head = Int8TiedHead(q, act8=True)
    rows = torch.randn(20, 32)
    many = head(rows)  # 20 rows: the PyTorch reference
    torch.testing.assert_close(torch.cat([head(rows[i : i + 5]) for i in range(0, 20, 5)]), many, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([head(rows[i : i + 1]) for i in range(20)]), many, atol=1e-4, rtol=1e-4)  # decode
    exact = F.linear(rows, q.dequantize())
    assert 0 < (many - exact).abs().max() < 0.03 * exact.abs().max()


def test_allocator_hits_budget_and_prefers_sensitive_layers():
    layers = [
        LayerChoice(
            name=f"l{i}",
            n_weights=1000,
            sizes={b: 1000 * b for b in (2, 3, 4)},
            costs={2: (i + 1) * 4.0, 3: (i + 1) * 1.0, 4: (i + 1) * 0.25},
        )
        for i in range(8)
    ]
    for target in (2.5, 3.0, 3.5):
        plan = allocate(layers, budget_bits=target * 8000, fixed_bits=0)
        bpw = sum(plan.values()) / 8
        assert target - 0.05 <= bpw <= target + 1e-9
        # the most sensitive layer (l7) never gets fewer bits than the least (l0)
        assert plan["l7"] >= plan["l0"]
    with pytest.raises(PippinError, match="budget is impossible"):
        allocate(layers, budget_bits=1.5 * 8000, fixed_bits=0)


@pytest.mark.parametrize("bpw", [4.0, 4.5])
def test_compress_hits_budget_and_decodes_like_full_forward(bpw):
    model = tiny_model()
    n_params = sum(p.numel() for p in model.parameters())
    report = compress_(model, CALIB, CompressConfig(bpw=bpw, n_seqs=2, seq_len=128))
    assert any(isinstance(m, PalettizedLinear) for m in model.modules())
    assert abs(report.bpw - stored_bits(model) / n_params) < 1e-9
    assert bpw - 0.3 <= report.bpw <= bpw  # small model: few layers, coarse steps
    # The compressed model still satisfies the engine's core invariant: cached decode == full forward.
    cache = KVCache(model.config, batch_size=1, max_len=64)
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        full = model(tokens)
    prefill(model, tokens[:, :8], torch.tensor([8]), cache)
    for t in range(8, 20):
        torch.testing.assert_close(decode_step(model, tokens[:, t], cache), full[:, t], atol=1e-4, rtol=1e-4)


def test_compression_is_reproducible_bit_for_bit():
    """Same model, text and config: the same bytes in every tensor, so the same base fingerprint (an adapter
    trained on one run's base matches the other's); a different calibration text gives another base."""
    from pippin.adapters.lora import base_fingerprint

    cfg = CompressConfig(bpw=3.5, n_seqs=2, seq_len=128, hessian_seqs=2, embed_bits=4)
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    report = compress_(a, CALIB, cfg)
    assert 3.2 < report.bpw <= 3.5  # the budget holds with every stored byte (LUTs, row scales) counted
    compress_(b, CALIB, cfg)
    compress_(c, CALIB[::-1], cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert base_fingerprint(a) == base_fingerprint(b) != base_fingerprint(c)
    big = torch.nn.Sequential(torch.nn.Linear(300, 300, bias=False))  # 90,000 weights: more than a LUT
    before = base_fingerprint(big)
    with torch.no_grad():
        big[0].weight[123, 45] += 1e-3
    assert base_fingerprint(big) != before


def test_compress_bad_inputs():
    with pytest.raises(PippinError, match="only 20 tokens"):
        compress_(tiny_model(), list(range(20)), CompressConfig())
    with pytest.raises(PippinError, match="does not have"):
        compress_(tiny_model(), CALIB, CompressConfig(plan={"layers.9.mlp.up_proj": 4}, seq_len=128))
    with pytest.raises(PippinError, match="unsupported bit widths"):
        compress_(tiny_model(), CALIB, CompressConfig(plan={"layers.0.mlp.up_proj": 5}, seq_len=128))
    with pytest.raises(PippinError, match="impossible"):
        compress_(tiny_model(), CALIB, CompressConfig(bpw=1.0, seq_len=128, n_seqs=2))


@pytest.mark.parametrize("row_scale", [True, False])
def test_compressed_checkpoint_roundtrip_needs_no_kmeans(tmp_path, monkeypatch, row_scale):
    from pippin.api import load_any
    from pippin.model.checkpoint import LoadedModel, save_pippin

    model = tiny_model()
    plan = {f"layers.{i}.{m}": b for i in range(2) for m, b in [("mlp.up_proj", 2), ("self_attn.q_proj", 4)]}
    cfg = CompressConfig(plan=plan, seq_len=128, n_seqs=2, kv8=True, row_scale=row_scale)
    report = compress_(model, CALIB, cfg)
    meta = quantization_meta(report, cfg)
    if not row_scale:
        del meta["row_scale"]  # as checkpoints written before linears had row scales
    save_pippin(LoadedModel(model=model, tokenizer=None, path=tmp_path, meta={}), tmp_path / "ck", extra_meta={"quantization": meta})
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["quantization"]["plan"] == plan
    import pippin.quant.compress as comp

    monkeypatch.setattr(comp, "fit_palette", lambda *a, **k: pytest.fail("loading ran k-means"))
    loaded = load_any(tmp_path / "ck")
    from pippin.api import uses_kv8

    assert uses_kv8(loaded)  # the checkpoint asks for an 8-bit KV cache; load_engine follows it
    assert (loaded.model.layers[0].mlp.up_proj.row_scale is not None) == row_scale
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert Engine(loaded.model, max_len=32).generate_ids([[1, 2]], params) == Engine(model, max_len=32).generate_ids([[1, 2]], params)


@pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable")
def test_fused_block_runs_palettized_projections_like_the_reference():
    model = tiny_model()
    plan = {
        f"layers.{i}.{m}": b
        for i in range(2)
        for m, b in [
            ("self_attn.q_proj", 2),
            ("self_attn.k_proj", 3),
            ("self_attn.v_proj", 4),
            ("self_attn.o_proj", 6),
            ("mlp.gate_proj", 8),
            ("mlp.up_proj", 4),
        ]
    }  # down_proj stays dense: mixed dense + LUT in one block
    compress_(model, CALIB, CompressConfig(plan=plan, seq_len=128, n_seqs=2))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = Engine(model, max_len=64, kernels=False).generate_ids([[5, 6, 7, 8]], params)
    with fused_block_calls() as calls:
        assert Engine(model, max_len=64).generate_ids([[5, 6, 7, 8]], params) == ref
    assert len(calls) == 2 * 12  # both blocks, for the 4-token prefill and each of the 11 decode steps


@pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable")
def test_act8_kernel_matches_its_reference_and_the_fused_block():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(48, 64, generator=g), torch.randn(3, 64, generator=g)
    lin = PalettizedLinear.from_palette(fit_palette(w, bits=4, group_size=16))
    lin.act8 = True
    assert lin.uses_act8_kernel()
    ref = lin._act8_reference(x)
    torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)  # integer kernel == its PyTorch reference
    assert (ref - F.linear(x, lin.dequantize())).abs().max() < 0.05 * ref.abs().max()  # and close to fp32
    odd = PalettizedLinear.from_palette(fit_palette(torch.randn(48, 40, generator=g), bits=4))
    odd.act8 = True  # an input width that is no multiple of 64 has no act8 path: it stays fp32
    x40 = torch.randn(2, 40, generator=g)
    assert not odd.uses_act8_kernel()
    torch.testing.assert_close(odd(x40), F.linear(x40, odd.dequantize()), atol=1e-4, rtol=1e-4)

    # A model with act8 layers decodes the same through the fused block as through the module path.
    model = tiny_model()
    plan = {f"layers.{i}.{m}": 4 for i in range(2) for m in ("mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj")}
    compress_(model, CALIB, CompressConfig(plan=plan, act8=True, seq_len=128, n_seqs=2))
    cache = KVCache(model.config, batch_size=1, max_len=64)
    tokens = torch.randint(0, 256, (1, 14), generator=g)
    prefill(model, tokens[:, :4], torch.tensor([4]), cache)
    module_path = [decode_step(model, tokens[:, t], cache) for t in range(4, 14)]
    dec = FusedDecoder.from_model(model)
    fused = []
    for variant in kernel_variants():  # the fused step on each variant this CPU runs: all equal the module path
        with use_variant(variant):
            cache = KVCache(model.config, batch_size=1, max_len=64)
            prefill(dec, tokens[:, :4], torch.tensor([4]), cache)
            fused.append([decode_step(dec, tokens[:, t], cache) for t in range(4, 14)])
        for got, ref_logits in zip(fused[-1], module_path):
            torch.testing.assert_close(got, ref_logits, atol=1e-4, rtol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(fused[-1], fused[0]))


@pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable")
@pytest.mark.parametrize("row_scale", [False, True])
def test_fused_decoder_built_after_lut_and_act8_changes_follows_them(row_scale):
    # The decoder's plan keeps its arguments in C++: one built after a LUT or its indices change in place, or an
    # act8 flag switches, must read the new weights (the act8 kernels' cached LUTs and expanded bytes follow).
    model = tiny_model()
    # q, k, v (and gate, up) at different widths: each shared input is quantized once per width, and they run as
    # one call writing side by side; layer 0 keeps o and down dense.
    # 6-bit layers run on expanded bytes (kernel bits 8), mixed into the same calls.
    widths = {"self_attn.q_proj": 2, "self_attn.k_proj": 3, "self_attn.v_proj": 6, "mlp.gate_proj": 3, "mlp.up_proj": 4}
    plan = {f"layers.{i}.{m}": b for i in range(2) for m, b in widths.items()} | {
        "layers.1.mlp.down_proj": 6,
        "layers.1.self_attn.o_proj": 2,
    }
    compress_(model, CALIB, CompressConfig(plan=plan, act8=True, seq_len=128, n_seqs=2, row_scale=row_scale))
    tokens = torch.tensor([[5, 6, 7, 8, 9]])

    def decode(kernels: bool) -> torch.Tensor:
        fwd = FusedDecoder.from_model(model) if kernels else model
        cache = KVCache(model.config, batch_size=1, max_len=32)
        prefill(fwd, tokens[:, :4], torch.tensor([4]), cache)
        return decode_step(fwd, tokens[:, 4], cache)

    gate, down = model.layers[1].mlp.gate_proj, model.layers[1].mlp.down_proj
    assert down.uses_act8_kernel() and down.act8_kernel_args()[3] == 8
    with fused_block_calls() as calls:
        torch.testing.assert_close(decode(True), decode(False), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            gate.lut.mul_(-1.5)
        torch.testing.assert_close(decode(True), decode(False), atol=1e-4, rtol=1e-4)
        with torch.no_grad():  # new indices in place: the expanded bytes of a 6-bit layer must follow
            down.packed.copy_(down.packed.roll(1, dims=0))
        torch.testing.assert_close(decode(True), decode(False), atol=1e-4, rtol=1e-4)
        if row_scale:  # new row scales in place: the act8 kernels' output scales must follow
            with torch.no_grad():
                down.row_scale.mul_(torch.linspace(0.5, 2.0, down.out_features).half())
            torch.testing.assert_close(decode(True), decode(False), atol=1e-4, rtol=1e-4)
        gate.act8 = False  # and gate's fp32 LUT kernel takes its row scales
        torch.testing.assert_close(decode(True), decode(False), atol=1e-4, rtol=1e-4)
    assert (down.row_scale is not None) == row_scale
    assert len(calls) == (5 if row_scale else 4) * 2 * 2  # every prefill and decode step ran fused, on both blocks


@pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable")
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize(
    ("n", "k", "group", "rows"), [(48, 64, 16, 1), (33, 192, 1, 1), (80, 128, 16, 3), (7, 64, 1, 16), (32, 128, 16, 45)]
)
@pytest.mark.parametrize("row_scale", [False, True])
def test_act8_kernel_every_bit_width_and_odd_shapes(bits, n, k, group, rows, row_scale):
    # The integer kernel reads 2-, 3- and 4-bit indices straight from the packed bitstream (each width in
    # its own byte order, with x quantized to match), and 6- and 8-bit layers from their expanded bytes: it must
    # equal the PyTorch reference of the same numerics for odd row counts (the two-rows-at-a-time loop's tail),
    # per-row LUTs and batched rows (45: a prefill, which runs on the kernel too).
    g = torch.Generator().manual_seed(bits * 100 + n)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    lin = PalettizedLinear.from_palette(fit_palette(w, bits=bits, group_size=group, row_scale=row_scale))
    lin.act8 = True
    assert lin.uses_act8_kernel()
    ref = lin._act8_reference(x)
    rs = lin.row_scale.float() if row_scale else torch.ones(n)
    torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)
    w_k, lut_k, scale_k, bits_k = lin.act8_kernel_args()
    outs = []
    for variant in kernel_variants():  # every variant this CPU runs: the same integers, so the same floats
        with use_variant(variant):
            outs.append(ops().lut_gemv_act8(x, w_k, lut_k, scale_k, bits_k, group))
        torch.testing.assert_close(outs[-1], ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(outs[-1], outs[0]), variant
    exact = F.linear(x, lin.dequantize())
    assert (ref - exact).abs().max() < 0.05 * exact.abs().max()
    # The reference itself, written out: x rounded to 7 bits with a scale per 64 features, times the int8 LUT rows
    # gathered by the unpacked indices.
    xb = x.view(rows, k // 64, 64)
    scale = xb.abs().amax(-1, keepdim=True) / 63
    xq = (torch.round(xb / scale) * scale).view(rows, k)
    lut_i8, lut_scale = lin.lut_int8()
    assert lut_i8.abs().max() == 127
    w = (lut_i8.float() * lut_scale[:, None]).repeat_interleave(group, 0).gather(1, unpack(lin.packed, bits, k))
    torch.testing.assert_close(ref, xq @ w.T * rs, atol=1e-5, rtol=1e-5)
    if row_scale:  # the kernels take one output scale per row: the group's LUT scale times the row's own
        torch.testing.assert_close(lin.act8_kernel_args()[2], lut_scale.repeat_interleave(group) * rs)
    if bits == 3:  # 3-bit layers run the 4-bit kernel on their indices widened to nibbles (a copy in memory)
        nibbles, _, _, kernel_bits = lin.act8_kernel_args()
        assert kernel_bits == 4 and torch.equal(unpack(nibbles, 4, k), unpack(lin.packed, 3, k))
    if bits > 4:  # the expanded bytes are those int8 LUT values, shifted by 128
        expanded = lin.act8_kernel_args()[0]
        assert expanded.dtype == torch.uint8 and expanded.shape == (n, k)
        assert torch.equal(expanded.to(torch.int16) - 128, (w / lut_scale.repeat_interleave(group)[:, None]).round().to(torch.int16))


@pytest.mark.parametrize("row_scale", [True, False])
@pytest.mark.parametrize("embed_bits", [4, 6])
def test_palettized_embedding_serves_lookup_and_head_and_reloads(tmp_path, embed_bits, row_scale):
    from pippin.model.checkpoint import LoadedModel, load_pippin, save_pippin
    from pippin.quant.linear import PalettizedEmbedding, PalettizedTiedHead

    model = tiny_model()
    full = model.embed_tokens.weight.detach().clone()
    cfg = CompressConfig(candidate_bits=(4,), bpw=16, embed_bits=embed_bits, embed_row_scale=row_scale, seq_len=128, n_seqs=2)
    report = compress_(model, CALIB, cfg)
    e = model.embed_tokens
    assert isinstance(e, PalettizedEmbedding) and isinstance(model.lm_head, PalettizedTiedHead)
    w = e.dequantize()
    tokens = torch.tensor([[3, 17, 255, 0]])
    torch.testing.assert_close(e(tokens)[0], w[tokens[0]])  # lookup = rows of the dequantized matrix
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(model.lm_head(x), x @ w.T, atol=1e-4, rtol=1e-4)  # head = same matrix (kernel rows)
    big = torch.randn(2, 20, 64)
    torch.testing.assert_close(model.lm_head(big), big @ w.T, atol=1e-4, rtol=1e-4)  # (reference rows)
    assert (e.row_scale is not None) == row_scale and quantization_meta(report, cfg)["embedding_row_scale"] == row_scale
    e.act8 = True  # the integer head: the kernel (few rows) against the act8 reference (many rows)
    torch.testing.assert_close(model.lm_head(big[:, :3]), model.lm_head(big)[:, :3], atol=1e-4, rtol=1e-4)
    assert (model.lm_head(big) - big @ w.T).abs().max() < 0.05 * (big @ w.T).abs().max()
    e.act8 = False
    assert ((w - full) ** 2).sum() / (full**2).sum() < (0.05 if embed_bits == 4 else 0.01)
    # Every stored byte is counted, and the layout reloads from config.json alone.
    assert report.bpw == pytest.approx(stored_bits(model) / sum(p.numel() for p in tiny_model().parameters()))
    save_pippin(LoadedModel(model=model, tokenizer=None, path=tmp_path, meta={"quantization": quantization_meta(report, cfg)}), tmp_path)
    from pippin.api import _prepare

    again = load_pippin(tmp_path, prepare=_prepare).model
    torch.testing.assert_close(again(tokens), model(tokens))


def test_mixed_calibration_takes_windows_from_every_source_in_turn():
    from pippin.quant.calibrate import calibration_batches, mixed_windows

    a, b, c = list(range(0, 10)), list(range(100, 104)), list(range(200, 207))
    assert mixed_windows([a, b, c], seq_len=4) == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203, 4, 5, 6, 7, 204, 205, 206, 8, 9]
    first = calibration_batches(mixed_windows([a * 30, b * 70], seq_len=4), seq_len=4, n_seqs=2)
    assert first.tolist() == [[0, 1, 2, 3], [100, 101, 102, 103]]  # what calibration reads covers both sources


def test_stdlib_docstrings_are_read_without_importing_and_leave_the_fidelity_text_out():
    import sys

    from pippin.quant.calibrate import stdlib_docstrings

    assert len(stdlib_docstrings(1000)) > 500_000  # every module, parsed: not one imported (this one prints, that one
    assert "this" not in sys.modules and "antigravity" not in sys.modules  # opens a browser)
    text = stdlib_docstrings(12)
    assert text == stdlib_docstrings(12) and len(text) > 10_000  # deterministic, and real prose
    assert "Abstract Base Classes" in text  # abc, the first module by name
    assert len(stdlib_docstrings(20)) > len(text)
    from pydoc_data.topics import topics

    assert not any(topics[k][:200] in text for k in list(topics)[:50])  # the fidelity measure's technical text
