"""Export to GGUF (llama.cpp, Ollama): a plain llama-architecture file, exact for full precision, nearest types else.

Full precision is written losslessly: each weight in the smallest GGML type whose gguf-py round trip reproduces it
bit for bit (checked on every tensor; F32 when none does). The default model's weights are the shipped Q4_1 file
dequantized, so they come back as the same Q4_1 blocks (the Q8_0 embedding as Q8_0) and the export is as small as
the source. Norms stay F32, as llama.cpp's converter writes them.
Compressed tensors have no GGML twin (a LUT per 16 rows is not a block format): each goes to the nearest llama.cpp type
by bits (2 -> Q2_K, 3 -> Q3_K, 4 -> Q4_K, 6 -> Q6_K, 8 -> Q8_0) when gguf-py can quantize it, else to the smallest
type it can quantize with at least as many bits per weight (the fallbacks are listed in the report). The fidelity lost
is measured by loading the file back with pippin's own GGUF reader: KL(pippin || export) and top-1 agreement on
held-out text. Q/K rows are permuted to llama.cpp's RoPE layout (the inverse of checkpoint.unpermute_rope).
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pippin.errors import PippinError
from pippin.export.gguf_vocab import source_gguf_fields, tokenizer_fields
from pippin.export.tensors import ExportTensor, export_tensors
from pippin.io import atomic_path, write_json_atomic
from pippin.model.checkpoint import GGUF_NAMES, LoadedModel, load_gguf
from pippin.model.transformer import Transformer
from pippin.quant.linear import Int8TiedHead, PalettizedLinear

Q = gguf.GGMLQuantizationType
LOSSLESS = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
"""Block types tried, smallest first, for an exact re-encoding of a full-precision weight (then F16, then F32)."""
NEAREST = {2: Q.Q2_K, 3: Q.Q3_K, 4: Q.Q4_K, 5: Q.Q5_K, 6: Q.Q6_K, 8: Q.Q8_0}
"""The llama.cpp type closest to a palette of each width."""
_NAMES = {hf: gg for gg, hf in GGUF_NAMES.items()}
"""Hugging Face module names -> GGUF's (the inverse of the reader's map)."""


@dataclass(kw_only=True)
class TensorRecord:
    name: str
    """GGUF tensor name."""
    source: str
    """What pippin stores: fp32, palette<b>, int8."""
    wanted: str
    """The llama.cpp type closest to the source (the source-exact type for full precision)."""
    written: str
    """The GGML type in the file."""
    exact: bool
    """The file's dequantized values equal pippin's weight bit for bit."""
    rel_error: float
    """||written - pippin||^2 / ||pippin||^2."""


@dataclass(kw_only=True)
class GGUFReport:
    path: str
    size_bytes: int
    bpw: float
    """Bits of tensor data per parameter in the file."""
    exact: bool
    """Every tensor is pippin's bit for bit (full precision): logits equal pippin's."""
    tokenizer: str
    types: dict[str, int]
    fallbacks: dict[str, str]
    """Nearest type -> type written instead, where gguf-py cannot quantize the nearest one."""
    notes: list[str] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    tensors: list[TensorRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gguf_name(hf: str) -> str:
    """`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight` (the inverse of pippin.model.checkpoint's reader)."""
    stem, _, kind = hf.rpartition(".")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{_NAMES[rest]}.{kind}"
    return f"{_NAMES[stem]}.{kind}"


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved rows (inverse of checkpoint.unpermute_rope)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def can_quantize(qtype: Q) -> bool:
    """Whether this gguf-py can quantize to `qtype` (many K- and IQ-types it can only dequantize)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def bits_per_weight(qtype: Q) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def parse_types(spec: dict[int, str] | None) -> dict[int, Q]:
    """{bits: GGML type name} (e.g. {3: "Q8_0"}) checked: a type gguf-py can write, for a width pippin stores."""
    out = {}
    for bits, name in (spec or {}).items():
        qtype = getattr(Q, str(name).upper(), None)
        if int(bits) not in NEAREST or qtype is None or not (qtype in (Q.F32, Q.F16) or can_quantize(qtype)):
            usable = ["F32", "F16"] + [t.name for t in LOSSLESS if can_quantize(t)]
            raise PippinError(f"Cannot map {bits}-bit tensors to {name!r}: give bits in {sorted(NEAREST)} and one of {usable}.")
        out[int(bits)] = qtype
    return out


def lossy_type(bits: int, cols: int, overrides: dict[int, Q] | None = None) -> tuple[Q, Q]:
    """(nearest llama.cpp type, type to write) for a `bits`-wide palette with rows of `cols` weights; `overrides`
    ({bits: type}) replace the nearest type."""
    wanted = (overrides or {}).get(bits, NEAREST.get(bits, Q.Q8_0))
    if wanted in (Q.F32, Q.F16):
        return wanted, wanted
    usable = [
        t
        for t in {wanted, *LOSSLESS}
        if can_quantize(t) and cols % gguf.GGML_QUANT_SIZES[t][0] == 0 and bits_per_weight(t) >= bits_per_weight(wanted)
    ]
    return wanted, min(usable, key=bits_per_weight) if usable else Q.F16


def _encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, its dequantization) of a (rows, cols) fp32 array."""
    if qtype == Q.F32:
        return w, w
    data = gguf.quants.quantize(w, qtype)
    back = data.astype(np.float32) if qtype == Q.F16 else gguf.quants.dequantize(data, qtype)
    return data, np.asarray(back, dtype=np.float32).reshape(w.shape)


def exact_encoding(w: np.ndarray) -> tuple[Q, np.ndarray]:
    """The smallest type that stores `w` exactly, and its data. Each candidate is tried on one row first (cheap)."""
    if w.ndim == 2:
        for t in [t for t in LOSSLESS if can_quantize(t)] + [Q.F16]:
            if w.shape[1] % gguf.GGML_QUANT_SIZES[t][0]:
                continue
            if not np.array_equal(_encode(w[:1], t)[1], w[:1]):
                continue
            data, back = _encode(w, t)
            if np.array_equal(back, w):
                return t, data
    return Q.F32, w


def _source(t: ExportTensor) -> str:
    if t.bits is None:
        return "fp32"
    return "int8" if t.palette is None and t.bits == 8 else f"palette{t.bits}"


def _metadata(writer: gguf.GGUFWriter, loaded: LoadedModel) -> None:
    cfg = loaded.model.config
    writer.add_name(str(loaded.meta.get("name") or loaded.meta.get("gguf_name") or loaded.path.name))
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)


def _vocab(writer: gguf.GGUFWriter, loaded: LoadedModel) -> str:
    cfg = loaded.model.config
    fields = source_gguf_fields(loaded.meta.get("source"), cfg.vocab_size)
    how = f"copied from {loaded.meta.get('source')}"
    if fields is None and loaded.tokenizer is not None:
        fields, how = tokenizer_fields(loaded.tokenizer), "built from tokenizer.json"
    if fields is None:
        # The file still loads in pippin (ids in, logits out); llama.cpp needs a vocabulary to load it.
        if cfg.bos_token_id is not None:
            writer.add_bos_token_id(cfg.bos_token_id)
        if cfg.eos_token_ids:
            writer.add_eos_token_id(cfg.eos_token_ids[0])
        return "none (the model has no tokenizer: llama.cpp cannot load this file)"
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub)
    return how


def export_gguf(
    loaded: LoadedModel,
    out: str | Path,
    *,
    types: dict[int, str] | None = None,
    fidelity_tokens: list[int] | None = None,
    progress: bool = False,
) -> GGUFReport:
    """Write `loaded` as a llama-architecture GGUF at `out` and its report (JSON) next to it as <stem>.export.json.

    types: {bits: GGML type} for compressed tensors instead of the nearest types (e.g. {3: "Q8_0"}, or "F32": exact).
    fidelity_tokens: held-out token ids on which the file, loaded back by pippin, is compared with `loaded.model`."""
    out = Path(out)
    overrides = parse_types(types)
    model, cfg = loaded.model, loaded.model.config
    tensors = export_tensors(model)
    records, written_bits, n_params = [], 0, 0
    fallbacks: dict[str, str] = {}
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _metadata(writer, loaded)
        tokenizer = _vocab(writer, loaded)
        for t in tqdm(tensors, desc="gguf", unit="tensor", disable=not progress):
            w = t.weight
            if t.name.endswith("q_proj.weight"):
                w = permute_rope(w, cfg.n_heads)
            elif t.name.endswith("k_proj.weight"):
                w = permute_rope(w, cfg.n_kv_heads)
            w = w.contiguous().numpy()
            if t.bits is None or w.ndim == 1:
                qtype, data = exact_encoding(w)
                wanted, back = qtype, w
            else:
                wanted, qtype = lossy_type(t.bits, w.shape[1], overrides)
                if wanted != qtype:
                    fallbacks[wanted.name] = qtype.name
                data, back = _encode(w, qtype)
            err = float(((back.astype(np.float64) - w) ** 2).sum() / max((w.astype(np.float64) ** 2).sum(), 1e-30))
            name = gguf_name(t.name)
            records.append(
                TensorRecord(
                    name=name, source=_source(t), wanted=wanted.name, written=qtype.name, exact=bool(np.array_equal(back, w)), rel_error=err
                )
            )
            writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
            written_bits += data.nbytes * 8
            n_params += w.size
        writer.add_file_type(_file_type(records))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    report = GGUFReport(
        path=str(out),
        size_bytes=out.stat().st_size,
        bpw=written_bits / max(n_params, 1),
        exact=all(r.exact for r in records),
        tokenizer=tokenizer,
        types=dict(collections.Counter(r.written for r in records)),
        fallbacks=fallbacks,
        notes=_notes(loaded, tensors, fallbacks),
        tensors=records,
    )
    if fidelity_tokens:
        report.fidelity = measure_fidelity(model, out, fidelity_tokens)
    write_json_atomic(report_path(out), report.to_dict())
    return report


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".export.json")


def _file_type(records: list[TensorRecord]) -> int:
    """general.file_type: the type of most weights (llama.cpp's `MOSTLY_*`), ALL_F32 when none applies."""
    counts = collections.Counter(r.written for r in records if not r.name.endswith("norm.weight"))
    top = counts.most_common(1)[0][0] if counts else "F32"
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{top}", gguf.LlamaFileType.ALL_F32))


def _notes(loaded: LoadedModel, tensors: list[ExportTensor], fallbacks: dict[str, str]) -> list[str]:
    """How pippin features without a GGUF equivalent were handled."""
    q = loaded.meta.get("quantization") or {}
    notes = []
    if any(t.derived for t in tensors):
        notes.append(
            "rotated model: every rotation is folded into the weights; the head's M = R^T diag(gamma) R is folded into "
            "an untied output matrix (E M): a plain llama that needs no runtime rotation."
        )
    if any(t.rotated_input for t in tensors):
        notes.append(
            "down_proj's online input rotation (R4) has no llama.cpp op: those layers are written as their dense weight "
            "W = W' R^T (the LUTs hold W' = W R), re-quantized to the type above."
        )
    if q.get("embedding_row_scale") or q.get("row_scale"):
        notes.append("palettized weights with row scales: written as the scaled rows (dequantized), re-quantized to the types above.")
    if q.get("act8"):
        notes.append(
            "act8 (8-bit activations) is a runtime choice, not stored: llama.cpp quantizes activations itself (Q8 "
            "blocks) for its quantized matmuls."
        )
    if q.get("kv8"):
        notes.append("kv8: run llama.cpp with an 8-bit KV cache (--cache-type-k q8_0 --cache-type-v q8_0) for the same setting.")
    for wanted, got in fallbacks.items():
        notes.append(f"gguf-py cannot quantize {wanted}; {got} (the smallest type it can, with at least as many bits) was written instead.")
    return notes


def held_out_text() -> str:
    """Text no pippin model was tuned on: the Python language reference that ships with CPython (`pydoc_data`)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("assignment", "class", "exceptions", "for", "function"))


@torch.no_grad()
def measure_fidelity(reference: Transformer, path: str | Path, tokens: list[int], *, window: int = 256) -> dict[str, Any]:
    """KL(reference || the GGUF at `path` loaded by pippin) per next-token distribution, and top-1 agreement.

    The reference runs with its weights as stored and fp32 activations (act8 switched off for the measurement, then
    restored): the weights are what the file converts; activation rounding is each runtime's own."""
    exported = load_gguf(Path(path)).model
    switched = [m for m in reference.modules() if isinstance(m, (PalettizedLinear, Int8TiedHead)) and m.act8]
    for m in switched:
        m.act8 = False
    kls, agree, n = [], 0, 0
    try:
        for i in range(0, len(tokens), window):
            ids = torch.tensor([tokens[i : i + window]])
            p = F.log_softmax(reference(ids).float(), -1)
            q = F.log_softmax(exported(ids).float(), -1)
            kls.append((p.exp() * (p - q)).sum(-1).flatten())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            n += ids.numel()
    finally:
        for m in switched:
            m.act8 = True
    kl = torch.cat(kls)
    return {
        "n_tokens": n,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": agree / max(n, 1),
        "reference": "pippin's model, weights as stored, fp32 activations",
    }


def fidelity_tokens(loaded: LoadedModel, n: int) -> list[int]:
    """`n` tokens of held-out text for `measure_fidelity` (random ids, seed 0, for a model without a tokenizer)."""
    if loaded.tokenizer is None:
        return torch.randint(0, loaded.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = loaded.tokenizer.encode(held_out_text())
    if len(ids) < n:
        raise PippinError(f"The held-out text has {len(ids)} tokens; ask for at most that many.")
    return ids[:n]
