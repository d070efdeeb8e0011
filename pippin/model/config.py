"""Model configuration: one dataclass that fully describes a pippin transformer, plus named presets.

`ModelConfig` is the single source of truth for the architecture. It is written as JSON next to every
checkpoint pippin saves, so an artifact describes itself and nothing is guessed from file names.
Presets follow the shapes they name: SmolLM2-135M (the default model) and AFM on-device 2024
(26 layers, d 3072, 24/8 heads, FFN 8064, vocab 49152; see shared/reference/afm.md §1.1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pippin.errors import PippinError


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only GQA transformer (Llama family, optional QK-norm)."""

    vocab_size: int = 49152
    """Rows of the token embedding (and of the output head)."""
    dim: int = 576
    """Model (residual stream) width."""
    n_layers: int = 30
    """Number of transformer blocks."""
    n_heads: int = 9
    """Query heads."""
    n_kv_heads: int = 3
    """Key/value heads; `n_heads` must be a multiple (grouped-query attention)."""
    head_dim: int | None = None
    """Per-head width; defaults to dim // n_heads."""
    ffn_dim: int = 1536
    """Hidden width of the SwiGLU MLP."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 100000.0
    """RoPE base frequency."""
    max_seq_len: int = 8192
    """Longest context the model was trained for; the engine refuses longer prompts."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    qk_norm: bool = False
    """RMSNorm over each query/key head before RoPE (AFM, Gemma 3, Qwen 3)."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence token id, if any."""
    eos_token_ids: list[int] = dataclasses.field(default_factory=lambda: [2])
    """Token ids that end generation."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE.")

    def param_counts(self) -> dict[str, int]:
        """Parameters by group, computed from the shape alone (no tensors needed)."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)  # q, o + k, v
        mlp = 3 * d * self.ffn_dim
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        per_layer = attn + mlp + norms
        embedding = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return {"embedding": embedding, "non_embedding": self.n_layers * per_layer + d}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown model config keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PRESETS: dict[str, ModelConfig] = {
    # Logic tests: 2 layers, dim 64, GQA 4:2.
    "tiny": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    # HuggingFaceTB/SmolLM2-135M-Instruct, the default model.
    "smollm2-135m": ModelConfig(),
    # AFM on-device 2024 (AXLearn honeycrisp-3B): 2.58B non-embedding + 0.15B embedding parameters.
    "afm-on-device": ModelConfig(
        vocab_size=49152,
        dim=3072,
        n_layers=26,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=8064,
        rope_theta=500000.0,
        max_seq_len=32768,
        qk_norm=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset; unknown names raise with the list of choices."""
    if name not in PRESETS:
        raise PippinError(f"Unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}.")
    return copy.deepcopy(PRESETS[name])
