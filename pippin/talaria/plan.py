"""How each op of a model is stored and computed: the `Plan` that Talaria prices and the what-if engine edits.

A plan holds every weight-bearing op's width (2/3/4/6/8-bit palettized, int8 or LUT embedding, 16/32-bit dense) and
the settings that change what an op moves or computes in (LUT group size, row scales, act8, rotation, KV and activation
widths). `plan_from_model` reads it from a pippin model's modules (loaded, or on the meta device from a checkpoint's
config.json through `apply_structure_`, the one reader of that record); `plan_from_config` builds one from a config and
a compress plan. `Plan.compress_plan()` is what `pippin compress --plan` takes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from pippin.errors import PippinError
from pippin.model.config import ModelConfig
from pippin.model.transformer import RMSNorm, TiedLinear, Transformer
from pippin.quant.compress import TARGETS, apply_structure_
from pippin.quant.linear import Int8Embedding, Int8TiedHead, PalettizedEmbedding, PalettizedLinear, PalettizedTiedHead
from pippin.quant.pack import SUPPORTED_BITS
from pippin.quant.rotate import RotatedHead

DENSE_BITS = (16, 32)
"""Widths of a dense (unquantized) weight: fp16/bf16 or fp32."""


@dataclass(kw_only=True)
class Plan:
    """How every op of a model is stored and computed: what the what-if engine edits and `ops_table` prices."""

    bits: dict[str, int]
    """Weight bits of each op that owns weights (linears, norms, embed_tokens, an untied lm_head): 2/3/4/6/8 palettized
    (on the embedding 8 means int8 rows with an fp32 scale each, 4/6 a LUT per group of rows), 16/32 dense."""
    group_size: int = 16
    """Rows sharing one fp16 LUT (palettized linears and embedding)."""
    embed_row_scale: bool = True
    """A palettized embedding keeps an fp16 scale per row."""
    row_scale: bool = True
    """Palettized linears keep an fp16 scale per output row (`pippin compress`'s default)."""
    act8: bool = False
    """Dynamic 8-bit activations: palettized linears and the compressed head compute in int8."""
    rotated: bool = False
    """Hadamard rotations folded into the weights: the tied head pays one dim x dim fp32 matmul per token."""
    rotated_inputs: bool = False
    """R4: each palettized down_proj whose width `hadamard` builds rotates its input online (`hadamard_flops` a token)
    and stores int8 signs, one per input."""
    kv_bits: int = 32
    """KV-cache width: 32 (pippin's CPU engine), 16, or 8 (int8 with an fp32 scale per token and head)."""
    act_bits: int = 32
    """Width of the activations an op reads and writes."""

    def compress_plan(self) -> dict[str, int]:
        """The {layer: bits} plan `pippin compress --plan` takes: the palettized linears (dense ones stay dense)."""
        return {n: b for n, b in self.bits.items() if is_linear(n) and b in SUPPORTED_BITS}

    def with_bits(self, updates: dict[str, int], *, tied: bool = True) -> Plan:
        """A copy with some ops' bits changed; each must be an op of this plan at a width it can take."""
        for name, b in updates.items():
            if name not in self.bits:
                raise PippinError(f"No op named {name!r} has weights; names look like {sorted(self.bits)[:2]}.")
            if b not in allowed_bits(name, tied=tied):
                raise PippinError(f"{name} cannot be stored at {b} bits; choose one of {allowed_bits(name, tied=tied)}.")
        return dataclasses.replace(self, bits={**self.bits, **{n: int(b) for n, b in updates.items()}})

    def describe(self) -> str:
        """One line: the linears' widths and the embedding's storage."""
        lin = [b for n, b in self.bits.items() if is_linear(n)]
        hist = ", ".join(f"{b}-bit x{lin.count(b)}" for b in sorted(set(lin)))
        e = self.bits.get("embed_tokens", 32)
        emb = {8: "int8"}.get(e, f"palette{e}" if e in (4, 6) else f"dense {e}-bit")
        extras = [s for s, on in (("act8", self.act8), ("rotated", self.rotated), (f"kv{self.kv_bits}", self.kv_bits != 32)) if on]
        return f"{len(lin)} linears: {hist}; embedding {emb}" + (f"; {', '.join(extras)}" if extras else "")


def is_linear(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in TARGETS


def allowed_bits(name: str, *, tied: bool = True) -> tuple[int, ...]:
    """The widths an op's weights can be stored at."""
    if is_linear(name):
        return SUPPORTED_BITS + DENSE_BITS
    if name == "embed_tokens":
        return ((4, 6) if tied else ()) + (8,) + DENSE_BITS  # a LUT embedding needs a tied model (compress_)
    return DENSE_BITS


def _dtype_bits(t: torch.Tensor) -> int:
    return t.element_size() * 8


def _linear_names(cfg: ModelConfig, i: int) -> list[str]:
    return [f"layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]


def _norm_names(cfg: ModelConfig, i: int) -> list[str]:
    qk = [f"layers.{i}.self_attn.q_norm", f"layers.{i}.self_attn.k_norm"] if cfg.qk_norm else []
    return [f"layers.{i}.input_layernorm", f"layers.{i}.post_attention_layernorm"] + qk


def weight_names(cfg: ModelConfig) -> list[str]:
    """Every op that owns weights, in execution order."""
    names = ["embed_tokens"]
    for i in range(cfg.n_layers):
        names += _norm_names(cfg, i) + _linear_names(cfg, i)
    return names + ["norm"] + ([] if cfg.tie_embeddings else ["lm_head"])


def skeleton(cfg: ModelConfig, quantization: dict | None = None) -> Transformer:
    """The model's module layout on the meta device (no memory, no weights), compressed as a checkpoint's config.json
    `quantization` record says (through `apply_structure_`, the one reader of that record)."""
    with torch.device("meta"):
        model = Transformer(cfg)
        if quantization is not None:
            apply_structure_(model, quantization)
    return model


def plan_from_model(model: Transformer, *, kv_bits: int = 32, act_bits: int = 32) -> Plan:
    """Read how each op is stored from the modules of a loaded (or meta-device) pippin model."""
    cfg: ModelConfig = model.config
    modules = dict(model.named_modules())
    bits: dict[str, int] = {}
    groups: set[int] = set()
    act8 = False
    embed_row_scale, row_scale = True, None
    for name in weight_names(cfg):
        m = modules.get(name)
        if isinstance(m, PalettizedLinear):  # PalettizedEmbedding too
            bits[name], act8 = m.bits, act8 or m.act8
            groups.add(m.group_size)
            if isinstance(m, PalettizedEmbedding):
                embed_row_scale = m.row_scale is not None
            elif row_scale is None:
                row_scale = m.row_scale is not None
            elif row_scale != (m.row_scale is not None):
                raise PippinError(f"Some palettized linears have row scales and some not ({name}); Talaria prices one kind.")
        elif isinstance(m, Int8Embedding):
            bits[name] = 8
        elif isinstance(m, (nn.Linear, nn.Embedding, RMSNorm)):
            bits[name] = _dtype_bits(m.weight)
        else:
            raise PippinError(f"Talaria cannot price the module {name} ({type(m).__name__}); it knows pippin's own modules.")
    head = model.lm_head.head if isinstance(model.lm_head, RotatedHead) else model.lm_head
    if isinstance(head, Int8TiedHead):
        act8 = act8 or head.act8
    elif not isinstance(head, (TiedLinear, PalettizedTiedHead, nn.Linear)):
        raise PippinError(f"Talaria cannot price the head ({type(head).__name__}).")
    if len(groups) > 1:
        raise PippinError(f"The palettized layers use several group sizes {sorted(groups)}; Talaria prices one.")
    return Plan(
        bits=bits,
        group_size=groups.pop() if groups else 16,
        embed_row_scale=embed_row_scale,
        row_scale=row_scale is not False,
        act8=act8,
        rotated=isinstance(model.lm_head, RotatedHead),
        rotated_inputs=any(isinstance(m, PalettizedLinear) and m.in_signs is not None for m in modules.values()),
        kv_bits=kv_bits,
        act_bits=act_bits,
    )


def plan_from_config(
    cfg: ModelConfig,
    compress_plan: dict[str, int] | None = None,
    *,
    dense_bits: int = 32,
    embed_bits: int | None = None,
    group_size: int = 16,
    embed_row_scale: bool = True,
    row_scale: bool = True,
    act8: bool = False,
    rotated: bool = False,
    rotated_inputs: bool | None = None,
    kv_bits: int = 32,
    act_bits: int = 32,
) -> Plan:
    """A plan from a config alone: every weight dense at `dense_bits`, the linears of `compress_plan` palettized, and
    the embedding at `embed_bits` (default dense). rotated_inputs (R4) defaults to `rotated`, as `pippin compress
    --rotate` does."""
    if dense_bits not in DENSE_BITS:
        raise PippinError(f"Dense weights are {DENSE_BITS} bits, not {dense_bits}.")
    plan = Plan(
        bits={n: dense_bits for n in weight_names(cfg)},
        group_size=group_size,
        embed_row_scale=embed_row_scale,
        row_scale=row_scale,
        act8=act8,
        rotated=rotated,
        rotated_inputs=rotated if rotated_inputs is None else rotated_inputs,
        kv_bits=kv_bits,
        act_bits=act_bits,
    )
    updates = dict(compress_plan or {})
    if embed_bits is not None:
        updates["embed_tokens"] = embed_bits
    for name in updates:
        if name != "embed_tokens" and not is_linear(name):
            raise PippinError(f"A compress plan names linear layers; {name!r} is not one (names look like layers.0.mlp.down_proj).")
    return plan.with_bits(updates, tied=cfg.tie_embeddings)


def linear_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(out, in) of a linear."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    return {
        "q_proj": (cfg.n_heads * hd, d),
        "k_proj": (cfg.n_kv_heads * hd, d),
        "v_proj": (cfg.n_kv_heads * hd, d),
        "o_proj": (d, cfg.n_heads * hd),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }[name.rsplit(".", 1)[-1]]
