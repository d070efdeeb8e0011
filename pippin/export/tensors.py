"""A pippin model, full precision or compressed, as the tensors an exporter writes: one dense weight per name.

Each tensor keeps its compression record: a palettized linear or embedding its bits, LUTs and indices (`Palette`), an
int8 embedding its width. A rotated model (`pippin compress --rotate`) has every rotation folded into its weights
except one: the tied head reads the final norm's output through M = R^T diag(gamma) R (`RotatedHead`). No plain Llama
runtime has that step, so it is folded into an untied head, lm_head.weight = E M (E the rotated embedding, M
symmetric): the model becomes a plain Llama with an output matrix of its own. A palettized layer that rotates its input
online (R4: its LUTs hold W R) is exported as its dense weight W = W' R^T, without a palette (no runtime pippin
exports to has the transform). Anything else that is not a plain
linear, embedding or norm (LoRA wrappers, unknown modules) is refused with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pippin.errors import PippinError
from pippin.model.transformer import RMSNorm, TiedLinear, Transformer
from pippin.quant.linear import Int8Embedding, Int8TiedHead, PalettizedEmbedding, PalettizedLinear, PalettizedTiedHead
from pippin.quant.pack import unpack
from pippin.quant.palettize import Palette
from pippin.quant.rotate import RotatedHead


@dataclass(kw_only=True)
class ExportTensor:
    """One weight as an exporter sees it."""

    name: str
    """Hugging Face name without the `model.` prefix: `layers.0.self_attn.q_proj.weight`, `embed_tokens.weight`, ..."""
    weight: torch.Tensor
    """The dense fp32 weight pippin computes with (dequantized; row scales and folded rotations applied)."""
    bits: int | None = None
    """Stored width of a compressed tensor (palette bits, or 8 for int8 rows); None for full precision."""
    palette: Palette | None = None
    """A palettized tensor's LUTs and indices (with row scales, of the unit-RMS rows)."""
    row_scale: torch.Tensor | None = None
    """(rows,) fp16 scale of each row of a palettized tensor: weight = row_scale[:, None] * palette.dequantize()."""
    derived: str | None = None
    """How a tensor that pippin does not store was made (the untied head of a rotated model)."""
    rotated_input: bool = False
    """A palettized linear with an online input rotation (R4): `weight` is W = W' R^T, and `palette` is None (the LUTs
    hold W' = W R, which no exported graph computes with)."""


def _palettized(name: str, m: PalettizedLinear) -> ExportTensor:
    """A palettized weight: its LUTs and indices (of the unit-RMS rows where it has row scales) and its row scales."""
    p = Palette(idx=unpack(m.packed, m.bits, m.in_features), lut=m.lut.clone(), bits=m.bits, group_size=m.group_size)
    scale = None if m.row_scale is None else m.row_scale.clone()
    return ExportTensor(name=name, weight=m.dequantize(), bits=m.bits, palette=p, row_scale=scale)


def _linear(name: str, m: nn.Module) -> ExportTensor:
    if type(m) is PalettizedLinear and m.in_signs is not None:
        return ExportTensor(name=name, weight=m.dequantize(), bits=m.bits, rotated_input=True)
    if type(m) is PalettizedLinear:
        return _palettized(name, m)
    if type(m) is nn.Linear and m.bias is None:
        return ExportTensor(name=name, weight=m.weight.detach().float().clone())
    raise PippinError(
        f"{name.removesuffix('.weight')} is a {type(m).__name__}, which has no place in an exported Llama; merge adapters "
        "into the base first (`pippin adapter merge`) and export the merged model."
    )


def _embedding(m: nn.Module) -> ExportTensor:
    name = "embed_tokens.weight"
    if type(m) is nn.Embedding:
        return ExportTensor(name=name, weight=m.weight.detach().float().clone())
    if type(m) is Int8Embedding:
        return ExportTensor(name=name, weight=m.dequantize(), bits=8)
    if type(m) is PalettizedEmbedding:
        return _palettized(name, m)
    raise PippinError(f"The embedding is a {type(m).__name__}; pippin exports nn.Embedding, int8 or palettized embeddings.")


def head_mix(model: Transformer) -> torch.Tensor | None:
    """M (dim, dim) of a rotated model's head (the head computes head(x @ M)), or None."""
    return model.lm_head.mix.detach().float() if isinstance(model.lm_head, RotatedHead) else None


def export_tensors(model: Transformer) -> list[ExportTensor]:
    """Every weight of `model` in Hugging Face order (embedding, blocks, final norm, head when untied)."""
    cfg = model.config
    if cfg.qk_norm:
        raise PippinError("Models with QK-norm (qwen3-style) have no llama-architecture export; pippin exports Llama models.")
    out = [_embedding(model.embed_tokens)]
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        out.append(_norm(p + "input_layernorm.weight", block.input_layernorm))
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            parent = getattr(block, part)
            out += [_linear(f"{p}{part}.{n}.weight", getattr(parent, n)) for n in names]
        out.append(_norm(p + "post_attention_layernorm.weight", block.post_attention_layernorm))
    out.append(_norm("norm.weight", model.norm))
    head = model.lm_head
    mix = head_mix(model)
    inner = head.head if mix is not None else head
    if isinstance(inner, (TiedLinear, Int8TiedHead, PalettizedTiedHead)):
        if mix is not None:
            # Logits = norm(h) M E^T = norm(h) (E M)^T: the rotation folded into an untied head of the embedding's kind.
            emb = out[0]
            out.append(ExportTensor(name="lm_head.weight", weight=emb.weight @ mix, bits=emb.bits, derived="E M (rotated head)"))
    elif mix is None:
        out.append(_linear("lm_head.weight", inner))
    else:
        raise PippinError("A rotated model with an untied head is not a layout pippin writes; re-compress the model.")
    return out


def _norm(name: str, m: nn.Module) -> ExportTensor:
    if type(m) is not RMSNorm:
        raise PippinError(f"{name.removesuffix('.weight')} is a {type(m).__name__}, not an RMSNorm.")
    return ExportTensor(name=name, weight=m.weight.detach().float().clone())


def is_tied(tensors: list[ExportTensor]) -> bool:
    return not any(t.name == "lm_head.weight" for t in tensors)
