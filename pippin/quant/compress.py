"""Compress a model: palettize its linears to a mixed-bit plan under a bpw budget, embeddings to 8 bits (or a LUT).

`compress_(model, calib_tokens, config)` optionally folds rotations into the weights (`pippin.quant.rotate`) and
rotates each down_proj's input online (R4: the layer stores W R and rotates x itself; its statistics are rotated as
R^T H R, no new pass), measures calibration statistics, fits LUTs for every candidate bit width (k-means, then
GPTQ-style error feedback choosing the indices), allocates bits to hit the budget at least estimated loss (or takes a given plan), and swaps
the modules in place, optionally block by block on the quantized model's own inputs (GPTQ's sequential order).
`apply_structure_` rebuilds the same module layout empty (on the meta device) so a compressed checkpoint
loads without any k-means. Every stored byte counts in the bpw.
Acts on module names and nn.Linear / nn.Embedding only; never imports the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pippin.errors import PippinError
from pippin.quant.allocate import LayerChoice, allocate
from pippin.quant.calibrate import (
    calibration_batches,
    fisher_diagonal,
    input_moments,
    input_second_moments,
    sequential_second_moments,
)
from pippin.quant.linear import Int8Embedding, Int8TiedHead, PalettizedEmbedding, PalettizedLinear, PalettizedTiedHead
from pippin.quant.pack import SUPPORTED_BITS
from pippin.quant.palettize import Palette, error_feedback, fit_palette, output_error
from pippin.quant.rotate import HadamardTransform, RotatedHead, down_input_signs, rotate_, rotate_moment, rotates_down_input

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SENSITIVITY_FILE = "sensitivity.json"
"""Written next to a compressed model: the allocator's cost of every layer at every candidate width (Talaria reads it)."""


@dataclass(kw_only=True)
class CompressConfig:
    bpw: float = 3.5
    """Target average bits per weight over every stored weight (indices, LUTs, embedding, norms)."""
    candidate_bits: tuple[int, ...] = (2, 3, 4)
    """Bit widths the allocator may give a layer."""
    group_size: int = 16
    """Output rows sharing one LUT (AFM / coremltools per_grouped_channel)."""
    plan: dict[str, int] | None = None
    """An explicit {layer: bits} plan; skips allocation (and the budget)."""
    act8: bool = False
    """Dynamic 8-bit per-token activations on palettized linears (the fast integer kernel for 4-bit layers)."""
    kv8: bool = False
    """Record that this model runs with an 8-bit KV cache (int8 with a scale per token and head)."""
    embed_bits: int = 8
    """The tied embedding (also the head): 8 = int8 rows with a scale each (AFM); 4 or 6 = a LUT per group of rows."""
    embed_row_scale: bool = True
    """A palettized embedding (embed_bits 4 or 6) keeps an fp16 scale per row and LUTs of unit-RMS rows."""
    row_scale: bool = True
    """Each palettized linear keeps an fp16 scale per output row, its LUTs holding unit-RMS rows (0.03 bits per
    weight; one multiply per output, folded into the kernels' LUT scale)."""
    seq_len: int = 256
    n_seqs: int = 8
    """Calibration windows: n_seqs sequences of seq_len tokens (the Fisher pass, which runs backward, uses these)."""
    error_feedback: bool = True
    """Choose indices with GPTQ-style error feedback against each layer's input second moment (the LUTs stay the
    k-means ones); off = nearest LUT entry. Also makes the allocator's cost the layer's output error."""
    hessian_seqs: int = 32
    """Calibration windows for the input second moments that error feedback uses (forward only, so cheap)."""
    rotate: bool = False
    """Fold randomized Hadamard rotations of the residual stream and of each value head into the weights first
    (`pippin.quant.rotate`): the same function, with outliers spread over all channels."""
    rotate_seed: int = 0
    """Seed of the rotations' random signs."""
    rotate_down: bool = True
    """With rotate, also rotate each down_proj's input online (QuaRot's R4: the layer stores W R and computes x R at
    run time, one fast Hadamard transform per token); widths `hadamard` cannot build stay unrotated."""
    sequential: bool = False
    """Quantize block by block, each layer's LUTs and indices fitted to its inputs on the model as already quantized
    (GPTQ's order; needs error_feedback): later layers correct the error of earlier ones. The bit plan is still
    allocated on full-precision statistics."""


@dataclass(kw_only=True)
class CompressReport:
    plan: dict[str, int]
    bpw: float
    """Measured: stored bits of every tensor / original parameter count."""
    linear_bpw: float
    """Average over the palettized linears alone (indices + LUTs)."""
    layers: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, dict[int, float]] = field(default_factory=dict)
    """The allocator's estimated loss increase of each layer at each candidate width (empty when a plan was given)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_target(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS


def _palette_bits(n: int, k: int, bits: int, group: int, row_scale: bool = False) -> int:
    """Stored bits of an (n, k) palettized matrix: indices, fp16 LUTs and fp16 row scales."""
    return n * k * bits + (n // group) * (2**bits) * 16 + (n * 16 if row_scale else 0)


def validate_plan(model: nn.Module, plan: dict[str, Any]) -> dict[str, int]:
    names = {n for n, m in model.named_modules() if _is_target(n, m) or isinstance(m, PalettizedLinear)}
    unknown = sorted(set(plan) - names)
    if unknown:
        raise PippinError(f"The plan names layers this model does not have: {unknown[:5]}. Layer names look like {sorted(names)[:2]}.")
    bad = {k: v for k, v in plan.items() if v not in SUPPORTED_BITS}
    if bad:
        raise PippinError(f"The plan gives unsupported bit widths {bad}; use one of {SUPPORTED_BITS}.")
    return {k: int(v) for k, v in plan.items()}


def load_plan(path: str | Path) -> dict[str, int]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PippinError(f"Cannot read the plan {path}: {e}.") from e
    plan = data.get("plan", data) if isinstance(data, dict) else None
    if not isinstance(plan, dict):
        raise PippinError(f"{path} must hold a JSON object {{layer name: bits}} (or {{'plan': {{...}}}}).")
    return plan


def stored_bits(model: nn.Module) -> int:
    """Every stored tensor's bits: parameters and persistent buffers (packed indices, LUTs, scales)."""
    return sum(t.numel() * t.element_size() * 8 for t in model.state_dict().values())


def compress_(
    model: nn.Module,
    calib_tokens: list[int],
    config: CompressConfig,
    *,
    progress: bool = False,
) -> CompressReport:
    """Palettize `model` in place (linears to the plan, tied embedding to int8). Returns the report."""
    n_params = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if _is_target(n, m)]
    if not names:
        raise PippinError("This model has no uncompressed linear layers to palettize (is it compressed already?).")
    for b in config.candidate_bits:
        if b not in SUPPORTED_BITS:
            raise PippinError(f"Unsupported bit width {b}; choose from {SUPPORTED_BITS}.")
    if config.embed_bits not in (4, 6, 8):
        raise PippinError(f"embed_bits must be 4, 6 or 8, got {config.embed_bits}.")
    plan = validate_plan(model, config.plan) if config.plan is not None else None
    if config.sequential and not config.error_feedback:
        raise PippinError("Sequential quantization is GPTQ's: it needs error_feedback.")
    if config.rotate:
        rotate_(model, seed=config.rotate_seed)
        modules = dict(model.named_modules())
    # R4: these layers are palettized as W R (their statistics rotated to match); the model's own weights stay W.
    r4 = {}
    if config.rotate and config.rotate_down:
        for n in names:
            signs = down_input_signs(n, modules[n].in_features, config.rotate_seed)
            if signs is not None:
                r4[n] = (signs, HadamardTransform(signs))
    n_seqs = max(config.n_seqs, config.hessian_seqs if config.error_feedback else 0)
    batches = calibration_batches(calib_tokens, seq_len=config.seq_len, n_seqs=n_seqs)
    fisher_batches = batches[: config.n_seqs]
    embed = getattr(model, "embed_tokens", None)
    head_name = "lm_head.head" if isinstance(model.lm_head, RotatedHead) else "lm_head"
    lut_embed = isinstance(embed, nn.Embedding) and config.embed_bits < 8 and _tied_embedding(model) is embed
    if isinstance(embed, nn.Embedding) and config.embed_bits < 8 and not lut_embed:
        raise PippinError("A palettized embedding needs a tied model (the embedding doubles as the head); use embed_bits=8.")
    # The head's input statistics weight the embedding's LUT fit (its rows are the head's output channels).
    stat_names = names + ([head_name] if lut_embed else [])
    hessians: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    if config.error_feedback and not (config.sequential and plan is not None):
        hessians = input_second_moments(model, list(batches), stat_names, progress=progress)
        moments = {n: h.diagonal().float() for n, h in hessians.items()}
    elif not config.error_feedback:
        moments = input_moments(model, batches, stat_names, progress=progress)
        if r4:  # diag(R^T H R) needs the whole H of these inputs
            hessians = input_second_moments(model, list(batches), list(r4), progress=progress)
    for name in r4:  # the rotated input x R has the second moment R^T H R (exact)
        if name in hessians:
            hessians[name] = rotate_moment(hessians[name], r4[name][1])
            moments[name] = hessians[name].diagonal().float()
    palettes: dict[tuple[str, int], Palette] = {}

    def weight(name: str) -> torch.Tensor:
        """The weight to palettize: W, or W R for an R4 layer."""
        w = modules[name].weight.detach()
        return r4[name][1](w.double()).to(w.dtype) if name in r4 else w

    def palette(name: str, bits: int) -> Palette:
        if (name, bits) not in palettes:
            w = weight(name)
            p = fit_palette(w, bits=bits, group_size=config.group_size, importance=moments[name], row_scale=config.row_scale)
            palettes[name, bits] = error_feedback(w, p, hessians[name]) if config.error_feedback else p
        return palettes[name, bits]

    def palettize(name: str) -> None:
        """Swap in the palettized layer of the plan's width, and report its errors."""
        w = weight(name)
        p = palette(name, plan[name])
        row = {"name": name, "bits": plan[name], "rel_error": float(((p.dequantize() - w) ** 2).sum() / (w**2).sum())}
        if config.error_feedback:
            H = hessians[name]
            row["rel_output_error"] = float(output_error(w, p, H).sum() / ((w.double() @ H.double()) * w.double()).sum())
        new = PalettizedLinear.from_palette(p, in_signs=r4[name][0] if name in r4 else None)
        new.act8 = config.act8
        _set_module(model, name, new)
        layers.append(row)

    def cost(name: str, bits: int, fisher: torch.Tensor) -> float:
        """Estimated loss increase: the Fisher-weighted squared weight error, or with error feedback each row's output
        error scaled by that row's Fisher mass per unit of input energy (equal when H is diagonal)."""
        if not config.error_feedback:  # in the original basis, where the Fisher diagonal was measured
            w, w_hat = modules[name].weight.detach(), palette(name, bits).dequantize()
            w_hat = r4[name][1](w_hat.double(), inverse=True).float() if name in r4 else w_hat
            return float((fisher * (w_hat - w) ** 2).sum())
        w, H = weight(name), hessians[name]  # the Fisher row sums and trace(H) are unchanged by R4
        row_scale = fisher.sum(1).double() / H.diagonal().sum().clamp_min(1e-30)
        return float((row_scale * output_error(w, palette(name, bits), H)).sum())

    embed_bits = 0
    if lut_embed:
        embed_bits = _palette_bits(*embed.weight.shape, config.embed_bits, config.group_size, config.embed_row_scale)
    elif isinstance(embed, nn.Embedding):
        embed_bits = embed.weight.numel() * 8 + embed.weight.shape[0] * 32
    all_costs: dict[str, dict[int, float]] = {}
    if plan is None:
        fisher = fisher_diagonal(model, fisher_batches, names, progress=progress)
        choices = []
        for name in tqdm(names, desc="fit LUTs", disable=not progress):
            w = modules[name].weight.detach()
            n, k = w.shape
            costs = {b: cost(name, b, fisher[name]) for b in config.candidate_bits}
            all_costs[name] = costs
            sizes = {b: _palette_bits(n, k, b, config.group_size, config.row_scale) for b in config.candidate_bits}
            choices.append(LayerChoice(name=name, n_weights=n * k, sizes=sizes, costs=costs))
        linear_params = sum(modules[n].weight.numel() for n in names)
        embed_params = embed.weight.numel() if isinstance(embed, nn.Embedding) else 0
        fixed = embed_bits + (n_params - linear_params - embed_params) * 32  # norms (and anything else) stay fp32
        fixed += sum(modules[n].in_features * 8 for n in r4)  # R4's int8 signs
        plan = allocate(choices, budget_bits=config.bpw * n_params, fixed_bits=fixed)
    layers: list[dict[str, Any]] = []
    if config.sequential:
        # Re-measure each group's inputs on the model quantized so far; the palettes fitted for allocation are stale.
        palettes.clear()
        stats = sequential_second_moments(model, batches, head=head_name if lut_embed else None, progress=progress)
        for group, H in stats:
            for name in group:
                hessians[name] = rotate_moment(H, r4[name][1]) if name in r4 else H
                moments[name] = hessians[name].diagonal().float()
                if name in plan:
                    palettize(name)
    else:
        for name in tqdm(names, desc="palettize", disable=not progress):
            if name in plan:  # a partial plan leaves the rest dense
                palettize(name)
    if lut_embed:
        model.embed_tokens, head = _palettize_embedding(
            embed.weight.detach(), config, moments[head_name], hessians.get(head_name) if config.error_feedback else None
        )
        _set_head(model, head)
    elif isinstance(embed, nn.Embedding):
        _quantize_embedding_(model, act8=config.act8)
    linear_bits = sum(modules_bits(model, [entry["name"] for entry in layers]))
    linear_w = sum(m.in_features * m.out_features for m in model.modules() if type(m) is PalettizedLinear)
    return CompressReport(
        plan=plan, bpw=stored_bits(model) / n_params, linear_bpw=linear_bits / max(linear_w, 1), layers=layers, costs=all_costs
    )


def _palettize_embedding(
    w: torch.Tensor, config: CompressConfig, moment: torch.Tensor, H: torch.Tensor | None
) -> tuple[PalettizedEmbedding, PalettizedTiedHead]:
    """The tied embedding as a LUT palette, fitted for its role as the head: k-means weighted by the head's input
    moments, then (with error feedback) indices chosen against the head's input second moment, which lowers the
    logits' error. With row scales the rows are normalised to unit RMS first (the scales are stored in fp16)."""
    p = fit_palette(w, bits=config.embed_bits, group_size=config.group_size, importance=moment, row_scale=config.embed_row_scale)
    if H is not None:
        p = error_feedback(w, p, H)
    q = PalettizedEmbedding.from_palette(p)
    q.act8 = config.act8
    return q, PalettizedTiedHead(q)


def set_act8_(model: nn.Module, enable: bool = True) -> int:
    """Switch dynamic 8-bit activations on (or off) for every compressed layer of a loaded model: the palettized
    linears (2-, 3- and 4-bit then take the integer kernels) and the int8 or palettized head. The weights do not
    change, so one checkpoint can be measured both ways. Returns how many modules were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, (PalettizedLinear, Int8TiedHead)):
            m.act8 = enable
            n += 1
    return n


def modules_bits(model: nn.Module, names: list[str]):  # noqa: ANN201 - generator of ints
    mods = dict(model.named_modules())
    for n in names:
        yield mods[n].nbytes() * 8


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tied_embedding(model: nn.Module) -> nn.Module | None:
    """The embedding the head reads, if the model is tied (looking through a `RotatedHead`)."""
    head = model.lm_head.head if isinstance(model.lm_head, RotatedHead) else model.lm_head
    return getattr(head, "_embedding", None)


def _set_head(model: nn.Module, head: nn.Module) -> None:
    """Replace the tied head, keeping a `RotatedHead` in front of it."""
    if isinstance(model.lm_head, RotatedHead):
        model.lm_head.head = head
    else:
        model.lm_head = head


def _quantize_embedding_(model: nn.Module, *, act8: bool = False) -> None:
    """Tied embedding -> int8 rows + scales, used both for lookup and (through Int8TiedHead) as the head."""
    tied = _tied_embedding(model) is model.embed_tokens
    q = Int8Embedding.from_float(model.embed_tokens.weight.detach())
    model.embed_tokens = q
    if tied:
        _set_head(model, Int8TiedHead(q, act8=act8))


def quantization_meta(report: CompressReport, config: CompressConfig) -> dict[str, Any]:
    """What config.json records so that `apply_structure_` can rebuild the layout."""
    return {
        "method": "palettize",
        "group_size": config.group_size,
        "plan": report.plan,
        "embedding": "int8" if config.embed_bits == 8 else f"palette{config.embed_bits}",
        "embedding_row_scale": config.embed_bits < 8 and config.embed_row_scale,
        "row_scale": config.row_scale,
        "act8": config.act8,
        "kv8": config.kv8,
        "error_feedback": config.error_feedback,
        "rotation": {"method": "hadamard", "seed": config.rotate_seed, "down_input": config.rotate_down} if config.rotate else None,
        "bpw": report.bpw,
    }


def sensitivity_record(report: CompressReport, config: CompressConfig) -> dict[str, Any]:
    """What `SENSITIVITY_FILE` holds: each layer's estimated loss increase at each candidate width, and how it was
    estimated (the allocator's cost; Talaria's quality predictor reads it)."""
    metric = "Fisher-scaled output error (error feedback)" if config.error_feedback else "Fisher-weighted squared weight error"
    return {
        "metric": metric,
        "rotation": config.rotate,
        "candidate_bits": list(config.candidate_bits),
        "costs": {name: {str(b): c for b, c in row.items()} for name, row in report.costs.items()},
    }


def apply_structure_(model: nn.Module, meta: dict[str, Any]) -> None:
    """Swap in empty compressed modules as recorded in `meta` (works on the meta device): no k-means."""
    if meta.get("method") != "palettize":
        raise PippinError(f"Unknown quantization method {meta.get('method')!r} in this checkpoint.")
    plan = validate_plan(model, meta["plan"])
    rot = meta.get("rotation")
    if rot is not None and (not isinstance(rot, dict) or rot.get("method") != "hadamard"):
        raise PippinError(f"Unknown rotation {rot!r} in this checkpoint's quantization record.")
    modules = dict(model.named_modules())
    down_input = rot is not None and bool(rot.get("down_input"))  # R4; records from before it have no such key
    for name, bits in plan.items():
        lin = modules[name]
        r4 = down_input and rotates_down_input(name, lin.in_features)
        new = PalettizedLinear(
            lin.in_features,
            lin.out_features,
            bits=bits,
            group_size=meta["group_size"],
            act8=bool(meta.get("act8")),
            row_scale=bool(meta.get("row_scale")),
            rotate_input=r4,
        )
        _set_module(model, name, new)
    emb = str(meta.get("embedding", ""))
    if emb.startswith("palette"):
        e = model.embed_tokens
        q = PalettizedEmbedding(
            e.num_embeddings,
            e.embedding_dim,
            bits=int(emb.removeprefix("palette")),
            group_size=meta["group_size"],
            act8=bool(meta.get("act8")),
            row_scale=bool(meta.get("embedding_row_scale")),
        )
        model.embed_tokens, model.lm_head = q, PalettizedTiedHead(q)
    if emb == "int8":
        e = model.embed_tokens
        q = Int8Embedding(e.num_embeddings, e.embedding_dim)
        tied = getattr(model.lm_head, "_embedding", None) is e
        model.embed_tokens = q
        if tied:
            model.lm_head = Int8TiedHead(q, act8=bool(meta.get("act8")))
    if rot is not None:
        model.lm_head = RotatedHead(model.config.dim, model.lm_head)
