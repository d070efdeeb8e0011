"""The per-op table: FLOPs and bytes against hand counts, stored bytes against the real modules' tensors."""

from __future__ import annotations

import pytest

from pippin.errors import PippinError
from pippin.model.config import get_preset
from pippin.quant.compress import quantization_meta, stored_bits
from pippin.talaria.ops import OpKind, matrix_bytes, ops_table, totals
from pippin.talaria.plan import plan_from_config, plan_from_model, skeleton
from tests.talaria.conftest import compressed_tiny

# The tiny preset: dim 64, 2 layers, 4 query heads and 2 KV heads of 16, FFN 128, vocab 256, tied.
D, H, HKV, HD, F, V = 64, 4, 2, 16, 128, 256


def by_name(rows):
    return {r.name: r for r in rows}


def test_dense_tiny_rows_match_hand_counts():
    cfg = get_preset("tiny")
    L, N = 10, 8
    rows = by_name(ops_table(cfg, context=L, prefill=N))
    assert len(rows) == 1 + 2 * (2 + 7 + 2) + 2  # embedding; per block 2 norms, 7 linears, attention, SwiGLU; norm, head
    q, k = rows["layers.0.self_attn.q_proj"], rows["layers.1.self_attn.k_proj"]
    assert (q.params, q.bits, q.stored_bytes, q.compute) == (D * H * HD, 32, D * H * HD * 4, "float")
    assert q.decode_flops == 2 * D * H * HD
    assert q.decode_bytes == D * H * HD * 4 + (D + H * HD) * 4  # weights once, input and output activations
    assert q.prefill_flops == 2 * D * H * HD * N
    assert q.prefill_bytes == D * H * HD * 4 + (D + H * HD) * 4 * N  # weights read once per chunk
    assert (k.params, k.decode_flops) == (D * HKV * HD, 2 * D * HKV * HD)
    down = rows["layers.0.mlp.down_proj"]
    assert (down.params, down.decode_flops) == (F * D, 2 * F * D)
    att = rows["layers.0.self_attn.attention"]
    assert att.kind == OpKind.ATTENTION and att.params == 0 and att.stored_bytes == 0
    assert att.decode_flops == 3 * (H + HKV) * HD + (4 * H * HD + 5 * H) * L  # RoPE, q.k and p.v, softmax
    kv_vec = HD * 4  # fp32 cache
    assert att.decode_bytes == 2 * HKV * kv_vec * (L + 1) + (2 * H + 2 * HKV) * HD * 4
    assert att.prefill_flops == 3 * (H + HKV) * HD * N + (4 * H * HD + 5 * H) * N * (N + 1) / 2
    norm = rows["layers.0.input_layernorm"]
    assert (norm.params, norm.stored_bytes, norm.decode_flops, norm.decode_bytes) == (D, D * 4, 4 * D, D * 4 + 2 * D * 4)
    act = rows["layers.1.mlp.act"]
    assert (act.decode_flops, act.decode_bytes) == (5 * F, 3 * F * 4)
    emb, head = rows["embed_tokens"], rows["lm_head"]
    assert (emb.stored_bytes, emb.decode_bytes, emb.prefill_bytes) == (V * D * 4, 2 * D * 4, 2 * D * 4 * N)  # one row a token
    assert (head.params, head.stored_bytes, head.shares) == (V * D, 0, "embed_tokens")
    assert head.decode_flops == 2 * V * D and head.decode_bytes == V * D * 4 + (D + V) * 4
    assert head.prefill_flops == head.decode_flops  # logits for the last prompt token only
    t = totals(list(rows.values()))
    assert t.n_params == sum(cfg.param_counts().values())
    assert t.stored_bytes == 4 * t.n_params and t.bpw == 32


def test_palettized_and_int8_storage_is_counted_with_luts_and_scales():
    cfg = get_preset("tiny")
    plan = plan_from_config(cfg, {"layers.0.self_attn.q_proj": 3, "layers.0.mlp.up_proj": 2}, embed_bits=8, act8=True, kv_bits=8)
    rows = by_name(ops_table(cfg, plan, context=10, prefill=4))
    q, up = rows["layers.0.self_attn.q_proj"], rows["layers.0.mlp.up_proj"]
    # indices + one fp16 LUT of 8 entries per 16 rows + an fp16 scale per row
    assert q.stored_bytes == D * D * 3 // 8 + (D // 16) * 8 * 2 + D * 2
    assert up.stored_bytes == F * D * 2 // 8 + (F // 16) * 4 * 2 + F * 2
    assert (q.compute, q.weights_decoded) == ("int8", D * D)
    assert rows["layers.0.self_attn.k_proj"].compute == "float"  # dense stays float under act8
    emb, head = rows["embed_tokens"], rows["lm_head"]
    assert emb.stored_bytes == V * D + V * 4  # int8 rows and an fp32 scale each
    assert emb.decode_bytes == D + 4 + D * 4
    assert head.decode_bytes == V * D + V * 4 + (D + V) * 4 and head.compute == "int8"
    att = rows["layers.0.self_attn.attention"]
    assert att.decode_bytes == 2 * HKV * (HD + 4) * 11 + (2 * H + 2 * HKV) * HD * 4  # int8 cache, fp32 scale per head
    lut = by_name(ops_table(cfg, plan_from_config(cfg, embed_bits=4), context=1, prefill=1))["embed_tokens"]
    assert lut.stored_bytes == matrix_bytes(V, D, 4, group_size=16, embedding=True, row_scale=True) == V * D // 2 + 16 * 16 * 2 + V * 2


@pytest.mark.parametrize("config", [{"act8": True}, {"embed_bits": 4, "rotate": True}, {"embed_bits": 6, "embed_row_scale": False}])
def test_stored_bytes_equal_the_compressed_modules_tensors(config):
    model, report = compressed_tiny(**config)
    rows = ops_table(model, context=16, prefill=16)
    state = model.state_dict()

    def tensor_bytes(prefix: str, exclude: str = "\0") -> int:
        return sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(prefix) and not k.startswith(exclude))

    for r in rows:
        if r.name == "lm_head.mix":
            assert r.stored_bytes == tensor_bytes("lm_head.", exclude="lm_head.head.")
        elif r.params and r.shares is None:
            assert r.stored_bytes == tensor_bytes(r.name + "."), r.name
    t = totals(rows)
    assert t.stored_bytes * 8 == stored_bits(model)
    assert t.bpw == pytest.approx(report.bpw, rel=1e-12)
    plan = plan_from_model(model)
    assert plan.compress_plan() == report.plan
    # The same storage read from the config.json record on the meta device (what `pippin talaria MODEL_DIR` does).
    meta = quantization_meta(report, _config(config))
    assert plan_from_model(skeleton(model.config, meta)).bits == plan.bits
    assert plan_from_model(skeleton(model.config, meta)).rotated_inputs == plan.rotated_inputs == bool(config.get("rotate"))
    if plan.rotated_inputs:  # R4 on down_proj (width 128 = 2^7): signs, no Paley mix (m = 1: 2 FLOPs), 7 butterflies
        assert by_name(rows)["layers.0.mlp.down_proj"].decode_flops == 2 * 64 * 128 + 128 * (1 + 2 + 7)


def _config(overrides):
    from pippin.quant.compress import CompressConfig

    return CompressConfig(**overrides)


def test_compressed_rows_compute_in_int8_where_act8_applies(tiny_compressed):
    model, _ = tiny_compressed
    rows = ops_table(model, context=8, prefill=8)
    lin = [r for r in rows if r.kind == OpKind.LINEAR]
    assert lin and all(r.compute == "int8" and r.bits in (2, 3, 4) for r in lin)
    assert by_name(rows)["lm_head"].compute == "int8"  # Int8TiedHead with act8


def test_a_compress_plan_applies_over_a_model_and_bad_plans_are_refused():
    cfg = get_preset("tiny")
    rows = by_name(ops_table(cfg, {"layers.1.mlp.down_proj": 4}, context=4, prefill=4))
    assert rows["layers.1.mlp.down_proj"].bits == 4 and rows["layers.0.mlp.down_proj"].bits == 32
    with pytest.raises(PippinError, match="No op named"):
        ops_table(cfg, {"layers.9.mlp.down_proj": 4})
    with pytest.raises(PippinError, match="cannot be stored at 5 bits"):
        ops_table(cfg, {"layers.0.mlp.down_proj": 5})
    with pytest.raises(PippinError, match="cannot be stored at 4 bits"):
        ops_table(cfg, {"layers.0.input_layernorm": 4})
    with pytest.raises(PippinError, match="multiple of the LUT group size"):
        ops_table(cfg, plan_from_config(cfg, {"layers.0.self_attn.k_proj": 4}, group_size=64))
    with pytest.raises(PippinError, match="at least 1"):
        ops_table(cfg, context=0)


@pytest.mark.parametrize(("bits", "read_bits"), [(2, 2), (3, 4), (4, 4), (6, 8), (8, 8)])
def test_act8_linears_move_what_the_kernel_reads(bits, read_bits):
    """Under act8 a 3-bit layer is read as 4-bit nibbles and 6/8-bit ones as a byte per weight, plus a 4-byte output
    scale per row and (at most 4 bits) a 16-byte int8 LUT per group; without act8 the stored indices, fp16 LUTs and
    fp16 row scales."""
    cfg = get_preset("tiny")
    name = "layers.0.mlp.up_proj"
    n, k = cfg.ffn_dim, cfg.dim
    for act8 in (True, False):
        plan = plan_from_config(cfg, {name: bits}, act8=act8)
        row = next(r for r in ops_table(cfg, plan, context=8, prefill=4) if r.name == name)
        groups = n // plan.group_size
        weights = n * k * read_bits // 8 + groups * (16 if bits <= 4 else 0) + n * 4 if act8 else row.stored_bytes
        assert row.decode_bytes == weights + (n + k) * 4
        assert row.stored_bytes == n * k * bits // 8 + groups * 2**bits * 2 + n * 2
