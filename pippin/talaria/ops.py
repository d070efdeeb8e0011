"""Talaria's per-op cost table: one row per operation of a decoder step, with its weights, FLOPs and bytes moved.

`ops_table(model_or_config, plan)` lists the ops of one step in execution order (the embedding lookup; per block the
norms, q/k/v, attention, o, the MLP linears and SwiGLU; the final norm and the head), each with its parameters, bits,
stored bytes (LUTs, scales and row scales counted exactly as pippin.quant stores them), and FLOPs and bytes moved for
one decode step at context L (batch 1: every weight read once) and for a prefill chunk of N tokens from an empty cache
(weights read once per chunk, logits for the last token only, as the engine does). No weights are needed: a `Plan` says
how each op is stored, read from a model's modules (loaded or on the meta device) or built from a config and a compress
plan (pippin.talaria.plan). The figures are counted, not measured: the `measured_*` columns stay None until
pippin.talaria.profile fills them with times of the real kernels.
Not counted: residual additions (2 * dim FLOPs a block) and cache traffic below DRAM. A multiply-add is 2 FLOPs.
Follows Talaria's table view (Hohman et al., CHI 2024; shared/reference/afm.md §8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum

from pippin.errors import PippinError
from pippin.model.config import ModelConfig
from pippin.model.transformer import Transformer
from pippin.quant.linear import ACT8_BLOCK
from pippin.quant.pack import SUPPORTED_BITS
from pippin.quant.rotate import hadamard_flops, rotates_down_input
from pippin.talaria.plan import DENSE_BITS, Plan, is_linear, linear_shape, plan_from_config, plan_from_model, weight_names

INT8_HEAD_BLOCK = 32
"""The int8 head's act8 kernel needs the model width to be a multiple of this."""
ACT8_READ_BITS = {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}
"""Bits per weight the act8 kernel reads for each stored width."""


class OpKind(StrEnum):
    EMBEDDING = "embedding"
    NORM = "norm"
    LINEAR = "linear"
    ATTENTION = "attention"
    ACTIVATION = "activation"
    HEAD = "head"


@dataclass(kw_only=True)
class OpRow:
    """One op of a decoder step and what it costs, counted from shapes and widths."""

    name: str
    """Hugging Face module name, or the module's name plus the op (`layers.0.self_attn.attention`, `layers.0.mlp.act`)."""
    kind: OpKind
    layer: int | None
    params: int
    """Weights the op computes with (a tied head's are the embedding's, stored once)."""
    bits: int | None
    """Weight width (None for ops without weights)."""
    stored_bytes: int
    """Bytes this op's own tensors take on disk and in memory (0 for a tied head: see `shares`)."""
    compute: str
    """'int8' (act8 integer kernels) or 'float' (the device's float precision)."""
    decode_flops: float
    """One decode step at the table's context length."""
    decode_bytes: float
    """Bytes moved from memory in one decode step: weights (read once), activations, KV cache."""
    prefill_flops: float
    """A prefill chunk of the table's N tokens (all of them, not per token)."""
    prefill_bytes: float
    weights_decoded: int = 0
    """Compressed weights expanded per step (and once per prefill chunk): what a LUT-decode throughput limits."""
    shares: str | None = None
    """The op whose stored tensors this one reads (a tied head reads embed_tokens)."""
    measured_decode_s: float | None = None
    """Measured seconds of this op in a decode step on this machine: the median over repeats (pippin.talaria.profile)."""
    measured_decode_iqr_s: float | None = None
    """Interquartile range of those repeats."""
    measured_prefill_s: float | None = None
    """Measured seconds of this op in the prefill chunk: the median over repeats."""
    measured_prefill_iqr_s: float | None = None
    measured_repeats: int | None = None
    """Repeats behind each measured median (the fewer of decode's and prefill's)."""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kind": self.kind.value}


def _check(cfg: ModelConfig, plan: Plan, context: int, prefill: int) -> None:
    missing = sorted(set(weight_names(cfg)) - set(plan.bits))
    if missing:
        raise PippinError(f"The plan does not say how {missing[:3]} are stored; build it with plan_from_config or plan_from_model.")
    if context < 1 or prefill < 1:
        raise PippinError(f"Context length and prefill tokens must be at least 1 (got {context} and {prefill}).")
    if plan.kv_bits not in (8, 16, 32) or plan.act_bits not in (8, 16, 32):
        raise PippinError(f"KV and activation widths are 8, 16 or 32 bits (got {plan.kv_bits} and {plan.act_bits}).")
    for name, b in plan.bits.items():
        if (is_linear(name) and b in SUPPORTED_BITS) or (name == "embed_tokens" and b in (4, 6)):  # LUTs per group of rows
            rows = cfg.vocab_size if name == "embed_tokens" else linear_shape(cfg, name)[0]
            if rows % plan.group_size:
                raise PippinError(f"{name} has {rows} rows, not a multiple of the LUT group size {plan.group_size}.")


def matrix_bytes(n: int, k: int, bits: int, *, group_size: int, embedding: bool = False, row_scale: bool = False) -> int:
    """Stored bytes of an (n, k) weight: dense n*k*bits/8; palettized the packed indices plus one fp16 LUT of 2**bits
    entries per group of rows (PalettizedLinear's buffers) and an fp16 scale per row when it has row scales; an int8
    embedding adds an fp32 scale per row."""
    if bits in DENSE_BITS:
        return n * k * bits // 8
    if embedding and bits == 8:
        return n * k + n * 4
    return n * k * bits // 8 + (n // group_size) * 2**bits * 2 + (n * 2 if row_scale else 0)


def _row_bytes(k: int, bits: int, plan: Plan) -> int:
    """Bytes read to look up one embedding row: the row, and its scale or its group's LUT."""
    if bits in DENSE_BITS:
        return k * bits // 8
    if bits == 8:
        return k + 4
    return k * bits // 8 + 2**bits * 2 + (2 if plan.embed_row_scale else 0)


def ops_table(
    source: Transformer | ModelConfig, plan: Plan | dict[str, int] | None = None, *, context: int = 512, prefill: int = 512
) -> list[OpRow]:
    """The per-op cost rows of one decoder step of `source` stored as `plan`.

    source: a pippin model (its modules say how each op is stored) or a bare config (dense fp32 unless `plan` says
    otherwise). plan: a full `Plan`, or a compress plan {layer: bits} applied on top of the source's own storage.
    context: tokens attended to by the decode step (the new one included). prefill: tokens of a prompt chunk."""
    if isinstance(source, Transformer):
        cfg, base = source.config, plan_from_model(source)
    elif isinstance(source, ModelConfig):
        cfg, base = source, plan_from_config(source)
    else:
        raise PippinError(f"ops_table takes a pippin Transformer or a ModelConfig, not {type(source).__name__}.")
    if plan is None:
        plan = base
    elif not isinstance(plan, Plan):
        plan = base.with_bits(dict(plan), tied=cfg.tie_embeddings)
    _check(cfg, plan, context, prefill)
    return _rows(cfg, plan, context, prefill)


def _rows(cfg: ModelConfig, plan: Plan, L: int, N: int) -> list[OpRow]:
    a = plan.act_bits / 8  # bytes per activation
    # Bytes of one cached key (or value) vector: D entries, plus an fp32 scale per token and head at 8 bits.
    kv_vec = cfg.head_dim * plan.kv_bits / 8 + (4 if plan.kv_bits == 8 else 0)
    d, H, Hkv, D, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    g = plan.group_size
    rows: list[OpRow] = []

    def norm(name: str, layer: int | None, width: int, vectors: int, *, tokens: int) -> None:
        """RMSNorm over `vectors` vectors of `width` per token (square, mean, rsqrt, scale, weight: ~4 FLOPs each)."""
        b = plan.bits[name]
        stored = width * b // 8
        per_tok_flops, per_tok_bytes = 4 * width * vectors, 2 * width * vectors * a
        rows.append(
            OpRow(
                name=name,
                kind=OpKind.NORM,
                layer=layer,
                params=width,
                bits=b,
                stored_bytes=stored,
                compute="float",
                decode_flops=per_tok_flops,
                decode_bytes=stored + per_tok_bytes,
                prefill_flops=per_tok_flops * tokens,
                prefill_bytes=stored + per_tok_bytes * tokens,
            )
        )

    def linear(name: str, layer: int | None, n: int, k: int, b: int, *, kind: OpKind = OpKind.LINEAR, stored: int | None = None) -> OpRow:
        """y = x W^T: 2nk FLOPs a token; the weights (stored bytes, LUTs included) are read once per step or chunk."""
        head = kind == OpKind.HEAD
        weight_bytes = matrix_bytes(n, k, b, group_size=g, embedding=head, row_scale=plan.embed_row_scale if head else plan.row_scale)
        # act8 runs where the kernels take it: a palettized matrix whose rows hold whole 64-activation blocks, or
        # the int8 head (rows a multiple of 32); dense weights compute in float.
        block = INT8_HEAD_BLOCK if kind == OpKind.HEAD and b == 8 else ACT8_BLOCK
        int8 = plan.act8 and b not in DENSE_BITS and k % block == 0
        # What the act8 kernel reads: the indices as stored at 2 and 4 bits, widened to 4-bit nibbles at 3, expanded to a
        # byte per weight at 6 and 8 (PalettizedLinear.act8_weights); a 16-byte int8 LUT per group, and an fp32 output
        # scale per row (the group's LUT scale times the row scale; the kernels take them per row).
        read = weight_bytes
        if int8 and kind == OpKind.LINEAR:
            read = n * k * ACT8_READ_BITS[b] // 8 + (n // g) * (16 if b <= 4 else 0) + n * 4
        row = OpRow(
            name=name,
            kind=kind,
            layer=layer,
            params=n * k,
            bits=b,
            stored_bytes=weight_bytes if stored is None else stored,
            compute="int8" if int8 else "float",
            decode_flops=2 * n * k,
            decode_bytes=read + (n + k) * a,
            prefill_flops=2 * n * k * N,
            prefill_bytes=read + (n + k) * a * N,
            weights_decoded=0 if b in DENSE_BITS else n * k,
        )
        rows.append(row)
        return row

    # Embedding lookup: one row a token (and its scale or LUT); dequantizing it costs a multiply per value.
    eb = plan.bits["embed_tokens"]
    lookup_flops = 0 if eb in DENSE_BITS else d * (2 if eb in (4, 6) and plan.embed_row_scale else 1)
    lookup_bytes = _row_bytes(d, eb, plan) + d * a
    rows.append(
        OpRow(
            name="embed_tokens",
            kind=OpKind.EMBEDDING,
            layer=None,
            params=V * d,
            bits=eb,
            stored_bytes=matrix_bytes(V, d, eb, group_size=g, embedding=True, row_scale=plan.embed_row_scale),
            compute="float",
            decode_flops=lookup_flops,
            decode_bytes=lookup_bytes,
            prefill_flops=lookup_flops * N,
            prefill_bytes=lookup_bytes * N,
            weights_decoded=0 if eb in DENSE_BITS else d,
        )
    )
    pairs = N * (N + 1) / 2  # query-key pairs of a causal prefill from an empty cache
    for i in range(cfg.n_layers):
        pre = f"layers.{i}"
        norm(f"{pre}.input_layernorm", i, d, 1, tokens=N)
        for p in ("q_proj", "k_proj", "v_proj"):
            name = f"{pre}.self_attn.{p}"
            linear(name, i, *linear_shape(cfg, name), plan.bits[name])
        if cfg.qk_norm:
            norm(f"{pre}.self_attn.q_norm", i, D, H, tokens=N)
            norm(f"{pre}.self_attn.k_norm", i, D, Hkv, tokens=N)
        # Attention: RoPE on q and k (3 FLOPs an entry), q.k and p.v (2*D each per head and key), softmax (~5 per score).
        # Decode reads the whole cache once; prefill writes its keys/values and reads them once per chunk (flash-style
        # tiling: the N x N scores never go to memory).
        rope = 3 * (H + Hkv) * D
        qkvo = (2 * H + 2 * Hkv) * D * a  # q, k, v in and the output
        rows.append(
            OpRow(
                name=f"{pre}.self_attn.attention",
                kind=OpKind.ATTENTION,
                layer=i,
                params=0,
                bits=None,
                stored_bytes=0,
                compute="float",
                decode_flops=rope + (4 * H * D + 5 * H) * L,
                decode_bytes=2 * Hkv * kv_vec * (L + 1) + qkvo,  # read L cached entries, write the new one
                prefill_flops=rope * N + (4 * H * D + 5 * H) * pairs,
                prefill_bytes=2 * Hkv * kv_vec * 2 * N + qkvo * N,
            )
        )
        name = f"{pre}.self_attn.o_proj"
        linear(name, i, *linear_shape(cfg, name), plan.bits[name])
        norm(f"{pre}.post_attention_layernorm", i, d, 1, tokens=N)
        for p in ("gate_proj", "up_proj"):
            name = f"{pre}.mlp.{p}"
            linear(name, i, *linear_shape(cfg, name), plan.bits[name])
        # SwiGLU: silu(gate) * up, ~5 FLOPs an entry; reads two ffn-wide vectors, writes one.
        rows.append(
            OpRow(
                name=f"{pre}.mlp.act",
                kind=OpKind.ACTIVATION,
                layer=i,
                params=0,
                bits=None,
                stored_bytes=0,
                compute="float",
                decode_flops=5 * F,
                decode_bytes=3 * F * a,
                prefill_flops=5 * F * N,
                prefill_bytes=3 * F * a * N,
            )
        )
        name = f"{pre}.mlp.down_proj"
        down = linear(name, i, *linear_shape(cfg, name), plan.bits[name])
        if plan.rotated_inputs and down.bits in SUPPORTED_BITS and rotates_down_input(name, F):
            # R4: x -> x R before the LUT matvec (in cache: FLOPs only), and the int8 signs stored with the layer
            t = hadamard_flops(F)
            down.stored_bytes += F
            down.decode_flops, down.prefill_flops = down.decode_flops + t, down.prefill_flops + t * N
            down.decode_bytes, down.prefill_bytes = down.decode_bytes + F, down.prefill_bytes + F
    # The final norm and the head run on the last position only in a prefill (the engine's logits_at).
    norm("norm", None, d, 1, tokens=1)
    if plan.rotated:
        # RotatedHead: M = R^T diag(gamma) R rebuilt in fp32 from gamma (fp32), signs (int8) and a seed (int64).
        mix = linear("lm_head.mix", None, d, d, 32, stored=d * 4 + d + 8)
        mix.params, mix.prefill_flops, mix.prefill_bytes = 0, mix.decode_flops, mix.decode_bytes  # buffers, one row
    if cfg.tie_embeddings:
        head = linear("lm_head", None, V, d, eb, kind=OpKind.HEAD, stored=0)
        head.shares = "embed_tokens"
        if eb in (4, 6) and plan.embed_row_scale:
            head.decode_flops += V  # the row scales multiply the logits
    else:
        head = linear("lm_head", None, V, d, plan.bits["lm_head"], kind=OpKind.HEAD)
    head.prefill_flops, head.prefill_bytes = head.decode_flops, head.decode_bytes
    return rows


@dataclass(kw_only=True)
class TableTotals:
    """Sums over a table: stored size, parameters (each stored weight once) and per-step work."""

    n_params: int
    stored_bytes: int
    bpw: float
    """Stored bits over parameters, every tensor counted (as `pippin compress` reports it)."""
    decode_flops: float
    decode_bytes: float
    prefill_flops: float
    prefill_bytes: float
    by_kind: dict[str, int] = field(default_factory=dict)
    """Stored bytes by op kind."""


def totals(rows: list[OpRow]) -> TableTotals:
    n_params = sum(r.params for r in rows if r.shares is None)
    stored = sum(r.stored_bytes for r in rows)
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r.kind.value] = by_kind.get(r.kind.value, 0) + r.stored_bytes
    return TableTotals(
        n_params=n_params,
        stored_bytes=stored,
        bpw=stored * 8 / max(n_params, 1),
        decode_flops=sum(r.decode_flops for r in rows),
        decode_bytes=sum(r.decode_bytes for r in rows),
        prefill_flops=sum(r.prefill_flops for r in rows),
        prefill_bytes=sum(r.prefill_bytes for r in rows),
        by_kind=by_kind,
    )
