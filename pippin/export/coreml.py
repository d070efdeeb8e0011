"""Export to Core ML through coremltools: an mlprogram (iOS 18) whose palettized weights are pippin's LUTs and indices.

What is converted: a stateful decoder (`DecoderGraph`): the KV cache is Core ML state, so one model prefills a
prompt (T tokens in one call) and then decodes (T = 1 per call), as an app runs it with an MLState per sequence; the
inputs have flexible shapes up to the cache's length. The graph is written out (explicit mask input, GQA by repeating
K/V, in-place cache writes that coremltools turns into state updates) because the torch frontend cannot trace
pippin's engine-facing forward (dynamic causal flag, `enable_gqa`).
Weights are fp16. A palettized layer's dense weight has at most 2^b distinct values per group of 16 rows, all fp16
(pippin stores fp16 LUTs), so coremltools' `palettize_weights`, per_grouped_channel, with a LUT of each group's
distinct values ("unique" at pippin's width, see `unique_lut`) rebuilds pippin's LUTs exactly; a palettized
embedding with row scales is converted as its unit-RMS rows (palettized) times the scales.
Full-precision weights, the int8 embedding and a rotated model's head mix M are stored as dense fp16 (rounded), and so
is a palettized layer that rotates its input online (R4): its LUTs hold W R, and the graph has no fast Hadamard op, so
its weight W = W' R^T is folded dense (larger: 16 bits a weight; `pippin compress --no-rotate-down` for a Core ML target).
`verify_coreml` reads the saved mlpackage's MIL program back (no prediction: Core ML does not run on Linux) and
compares every weight with pippin's: each `constexpr_lut_to_dense` op's LUT and indices, each dense const's values.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pippin.errors import PippinError
from pippin.export.tensors import ExportTensor, export_tensors, head_mix
from pippin.io import atomic_dir
from pippin.model.checkpoint import LoadedModel
from pippin.model.transformer import RMSNorm, Transformer


def _rms(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def causal_mask(n_new: int, end: int) -> torch.Tensor:
    """The `mask` input for `n_new` tokens at positions end - n_new .. end - 1: (1, 1, n_new, end) fp16, 0 where a
    query may look (itself and every earlier position) and -inf elsewhere."""
    return torch.full((1, 1, n_new, end), float("-inf")).triu(end - n_new + 1).half()


class DecoderGraph(nn.Module):
    """The traced graph: a stateful decoder with its KV cache as Core ML state (iOS 18), one call for a prefill of T
    tokens or a decode step (T = 1). Inputs: `tokens` (1, T) and `mask` (1, 1, T, end), see `causal_mask`; the
    new tokens sit at positions end - T .. end - 1, whose K/V it writes into the caches before attending over 0 .. end
    - 1. Weights: a dense copy `m` of the model (palettized weights as their LUT values), the row scales of palettized
    weights multiplied into their outputs, and a rotated head's M."""

    def __init__(self, model: Transformer, tensors: list[ExportTensor], context: int) -> None:
        super().__init__()
        cfg = model.config
        if not 0 < context <= cfg.max_seq_len:
            raise PippinError(f"context must be in [1, {cfg.max_seq_len}] (the model's context), got {context}.")
        self.context = context
        with torch.device("meta"):
            self.m = Transformer(cfg)
        state = {t.name: (t.palette.dequantize() if t.row_scale is not None else t.weight) for t in tensors if t.derived is None}
        self.m.load_state_dict(state, assign=True)
        self.m.rope_cos, self.m.rope_sin = torch.zeros(0), torch.zeros(0)  # meta buffers the graph does not use (it has its own tables)
        emb = tensors[0]
        self.register_buffer("row_scale", None if emb.row_scale is None else emb.row_scale.float())
        # The linears' row scales by module name (constants in the trace).
        self.scales = {
            t.name.removesuffix(".weight"): t.row_scale.float() for t in tensors[1:] if t.row_scale is not None and t.derived is None
        }
        self.register_buffer("mix", head_mix(model))
        self.register_buffer("cos", model.rope_cos[:context].clone())
        self.register_buffer("sin", model.rope_sin[:context].clone())
        a = model.layers[0].self_attn
        shape = (cfg.n_layers, 1, a.n_kv_heads, context, a.head_dim)  # Core ML state is fp16
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))
        self.eval()

    def reset(self) -> None:
        """Empty the caches (a new sequence; on the device, a new MLState)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = self.m
        T, end = tokens.shape[-1], mask.shape[-1]
        begin = end - T
        cos, sin = self.cos[begin:end], self.sin[begin:end]
        h = m.embed_tokens(tokens)
        if self.row_scale is not None:
            h = h * self.row_scale[tokens].unsqueeze(-1)
        for i, block in enumerate(m.layers):
            a, f = block.self_attn, block.mlp
            lin = self._linear(f"layers.{i}.")
            x = _rms(h, block.input_layernorm)
            q = lin("self_attn.q_proj", a.q_proj, x).view(1, T, a.n_heads, a.head_dim).transpose(1, 2)  # (1, H, T, D)
            k = lin("self_attn.k_proj", a.k_proj, x).view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
            v = lin("self_attn.v_proj", a.v_proj, x).view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin, a.head_dim // 2), _rope(k, cos, sin, a.head_dim // 2)
            self.k_cache[i, :, :, begin:end] = k.half()  # in place: Core ML's state update
            self.v_cache[i, :, :, begin:end] = v.half()
            rep = a.n_heads // a.n_kv_heads
            keys = self.k_cache[i, :, :, :end].float().repeat_interleave(rep, 1)
            values = self.v_cache[i, :, :, :end].float().repeat_interleave(rep, 1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.float())
            h = h + lin("self_attn.o_proj", a.o_proj, y.transpose(1, 2).reshape(1, T, a.n_heads * a.head_dim))
            x = _rms(h, block.post_attention_layernorm)
            h = h + lin("mlp.down_proj", f.down_proj, F.silu(lin("mlp.gate_proj", f.gate_proj, x)) * lin("mlp.up_proj", f.up_proj, x))
        x = _rms(h, m.norm)
        if self.mix is not None:
            x = x @ self.mix
        logits = m.lm_head(x)
        return logits if self.row_scale is None else logits * self.row_scale

    def _linear(self, prefix: str):  # noqa: ANN202 - (name, module, x) -> y
        """Apply a block's projection by name: the dense module, then its row scales if it has them."""

        def apply(name: str, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
            s = self.scales.get(prefix + name)
            return mod(x) if s is None else mod(x) * s

        return apply


def unique_lut(bits: int):  # noqa: ANN201 - coremltools' lut_function: group weights -> (LUT, indices)
    """coremltools' "unique" mode at a fixed width: the LUT is a group's distinct values, ascending, padded to 2^bits.

    Written out rather than `mode="unique"` for two reasons: unique mode picks its own width (the smallest that holds
    the values), and it finds the values with numpy's sort on the fp16 weights, which numpy 2.4 gets wrong on CPUs
    with AVX512-ICL dispatch (seen on AMD EPYC: `np.sort` of 9216 fp16 values returns them unsorted, so unique mode
    found 9-22 "distinct" values in 3-bit groups and fell back to 6 bits). Here the values are sorted in fp32."""

    def lut_function(val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, inverse = np.unique(val.astype(np.float32).ravel(), return_inverse=True)
        if len(values) > 2**bits:
            raise PippinError(f"A weight group has {len(values)} distinct values, more than a {bits}-bit palette holds.")
        lut = np.zeros(2**bits, dtype=np.float32)
        lut[: len(values)] = values
        return lut.astype(val.dtype), inverse.astype(np.uint8)

    return lut_function


def const_name(name: str) -> str:
    """The MIL const coremltools makes of graph weight `m.<name>` in fp16: `m_layers_0_..._weight_to_fp16`."""
    return "m_" + name.replace(".", "_") + "_to_fp16"


DEFAULT_CONTEXT = 2048
"""The KV cache's length when none is asked for (at most the model's context): 2048 tokens of SmolLM2-135M's cache are
47 MB of fp16 state."""


@dataclass(kw_only=True)
class CoreMLReport:
    path: str
    context: int
    """Positions the KV cache state holds: the longest prompt + reply."""
    palettized: int
    """Weights stored as LUT + indices (constexpr_lut_to_dense)."""
    dense: int
    checks: list[dict[str, Any]] = field(default_factory=list)
    """One per weight: name, kind, and whether the mlpackage's values equal pippin's."""
    all_equal: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_coreml(loaded: LoadedModel, out: str | Path, *, context: int | None = None) -> CoreMLReport:
    """Convert `loaded` to a stateful mlpackage at `out` (a folder, replaced whole) whose KV cache holds `context`
    positions (default: DEFAULT_CONTEXT or the model's context if shorter), palettize it with pippin's LUTs, verify it."""
    try:
        import coremltools as ct
        import coremltools.optimize.coreml as cto
    except ImportError as e:
        raise PippinError("Core ML export needs coremltools: pip install coremltools==9.0 (pippin's bench extra).") from e
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    out = Path(out)
    context = min(DEFAULT_CONTEXT, loaded.model.config.max_seq_len) if context is None else context
    tensors = export_tensors(loaded.model)
    graph = DecoderGraph(loaded.model, tensors, context)
    n = min(4, context)
    with torch.no_grad():
        traced = torch.jit.trace(graph, (torch.zeros(1, n, dtype=torch.long), causal_mask(n, n)))
    graph.reset()
    new, end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1), ct.RangeDim(lower_bound=1, upper_bound=context, default=1)
    mlmodel = ct.convert(
        traced,
        inputs=[
            ct.TensorType(name="tokens", shape=(1, new), dtype=np.int32),
            ct.TensorType(name="mask", shape=(1, 1, new, end), dtype=np.float16),
        ],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(graph, name).shape), dtype=np.float16), name=name)
            for name in ("k_cache", "v_cache")
        ],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
    )
    consts = {op.name for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "const"}
    pal = {const_name(t.name): t for t in tensors if t.palette is not None and t.derived is None}
    missing = sorted(set(pal) - consts)
    if missing:
        raise PippinError(f"coremltools named the weights differently than expected ({missing[:3]}); this coremltools is not supported.")
    configs = {
        name: cto.OpPalettizerConfig(
            mode="custom",
            lut_function=unique_lut(t.palette.bits),
            granularity="per_grouped_channel",
            group_size=t.palette.group_size,
            weight_threshold=0,
        )
        for name, t in pal.items()
    }
    if configs:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))
    describe(mlmodel, loaded, context)
    with atomic_dir(out) as tmp:  # MLModel.save wants a name ending .mlpackage: save inside, then lift the parts up
        mlmodel.save(str(tmp / "m.mlpackage"))
        for part in (tmp / "m.mlpackage").iterdir():
            part.rename(tmp / part.name)
        (tmp / "m.mlpackage").rmdir()
    checks = verify_coreml(out, tensors)
    return CoreMLReport(
        path=str(out),
        context=context,
        palettized=sum(c["kind"] == "palette" for c in checks),
        dense=sum(c["kind"] == "dense" for c in checks),
        checks=checks,
        all_equal=all(c["equal"] for c in checks),
    )


def describe(mlmodel: Any, loaded: LoadedModel, context: int) -> None:  # noqa: ANN401 - ct.models.MLModel
    """Name the model and say how to call it, in the package's own metadata (Xcode shows it)."""
    mlmodel.short_description = (
        f"{loaded.meta.get('name') or loaded.path.name}, exported by pippin: a stateful decoder (KV cache as state, "
        f"{context} positions). Each call appends T new tokens at positions end - T .. end - 1 and returns their logits."
    )
    mlmodel.input_description["tokens"] = "(1, T) int32 token ids: a prompt (T > 1) or the next token (T = 1)"
    mlmodel.input_description["mask"] = (
        "(1, 1, T, end) fp16 causal mask: 0 where a new token may look (positions up to its own), -inf elsewhere"
    )
    mlmodel.output_description["logits"] = "(1, T, vocab) fp16 next-token logits for each new token"
    mlmodel.user_defined_metadata["pippin.context"] = str(context)
    mlmodel.user_defined_metadata["pippin.vocab_size"] = str(loaded.model.config.vocab_size)


def read_program(path: str | Path) -> dict[str, Any]:
    """{op name: op} of the saved mlpackage's main function, read back from its spec and weight file."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = load_mil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    return {op.name: op for op in prog.functions["main"].operations}


def verify_coreml(path: str | Path, tensors: list[ExportTensor]) -> list[dict[str, Any]]:
    """Compare every weight in the mlpackage with pippin's (see the module docstring)."""
    ops = read_program(path)
    checks = []
    for t in tensors:
        if t.derived is not None:
            continue  # the rotated head is M and the embedding in this graph, not a weight of its own
        name = const_name(t.name)
        if t.palette is not None:
            op = ops.get(name + "_palettized")
            if op is None or op.op_type != "constexpr_lut_to_dense":
                checks.append({"name": t.name, "kind": "palette", "equal": False, "why": "no constexpr_lut_to_dense op"})
                continue
            checks.append({"name": t.name, "kind": "palette", **compare_palette(op.inputs["lut"].val, op.inputs["indices"].val, t)})
        else:
            op = ops.get(name)
            want = t.weight.half().numpy()
            row = {"name": t.name, "kind": "dense", "fp16_exact": bool(torch.equal(t.weight.half().float(), t.weight))}
            if op is None and bool((t.weight == 1).all()):
                row.update(equal=True, why="all ones: coremltools removed the multiply")  # a folded norm (rotated models)
            else:
                got = None if op is None else op.val.val
                row["equal"] = bool(got is not None and got.shape == want.shape and np.array_equal(got, want))
            checks.append(row)
    return checks


def compare_palette(lut: np.ndarray, idx: np.ndarray, t: ExportTensor) -> dict[str, Any]:
    """Core ML's (G, 1, n, 1) LUT and (N, K) indices against pippin's palette: identical arrays, or the same weights
    under a relabeling of each group's entries (unique mode drops duplicate and unused entries and sorts the rest)."""
    p = t.palette
    lut = lut.reshape(lut.shape[0], -1)
    ours_lut, ours_idx = p.lut.numpy(), p.idx.numpy()
    nbits = int(np.log2(lut.shape[1]))
    identical = lut.shape == ours_lut.shape and np.array_equal(lut, ours_lut) and np.array_equal(idx, ours_idx)
    groups = np.arange(idx.shape[0]) // p.group_size
    same_weights = idx.shape == ours_idx.shape and np.array_equal(lut[groups[:, None], idx], ours_lut[groups[:, None], ours_idx])
    return {"equal": bool(identical or same_weights), "identical": bool(identical), "bits": p.bits, "coreml_bits": nbits}
