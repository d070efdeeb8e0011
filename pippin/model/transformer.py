"""The pippin transformer: one single-device file for the Llama / AFM family of decoders.

Grouped-query attention, RMSNorm (optional per-head QK-norm), rotary positions, SwiGLU MLP, no
biases, tied or untied embeddings. Module names follow Hugging Face (`embed_tokens`,
`layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...) so checkpoints load by name and LoRA / palettization
can target modules by name from outside.

The model knows nothing of training, quantization, adapters or caching policy: the KV cache is owned by
the engine and passed in (any object with `update(layer, k, v) -> (k_all, v_all)`), and positions are
explicit inputs. Follows gpt-fast / nanochat for structure and HF LlamaForCausalLM for numerics.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pippin.model.config import ModelConfig


class LayerCache(Protocol):
    """What attention needs from a KV cache: store new keys/values, return everything to attend over."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel; computes in the input dtype like HF LlamaRMSNorm does for fp32.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) in HF's "rotate_half" layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by per-position angles; cos/sin are (B, 1, T, D), fp32 tables taken to x's dtype (as
    HF does), so bf16 compute stays bf16 and q/k/v reach attention in one dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, H*D) -> (B, H, T, D). Head counts are read from the projections (-1), not the config, so the same
        # code runs when tensor parallelism gives each rank a slice of the heads (the q:kv ratio stays the same).
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, S, D), S >= T
        # Without an explicit mask the keys are exactly the new tokens, so plain causal masking is right.
        causal = mask is None and T > 1
        if causal and k.shape[2] != T:
            raise ValueError("A mask is required when attending over cached tokens with more than one query.")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TiedLinear(nn.Module):
    """The output head of a tied model: a linear layer that reads the embedding matrix (no own parameters)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: no duplicate weights

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):  # noqa: ANN001, ANN201 - hot path, types as in Attention
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only transformer. `forward` maps token ids to logits; the caller owns cache and positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = TiedLinear(self.embed_tokens) if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved: derived from the config, rebuilt on load (and on the meta device they stay meta).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm plus output projection: hidden (..., dim) -> logits (..., V)."""
        return self.lm_head(self.norm(h))

    def features(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, dim) after the last block, before the final norm (see `forward`).

        Training uses it to run the head only where the loss is taken (the head is the largest matmul)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, D)
        sin = self.rope_sin[positions].unsqueeze(1)
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = block(h, cos, sin, cache, mask)
        return h

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` (B, T).

        positions: (B, T) RoPE positions; default 0..T-1 for every row.
        cache: stores this call's keys/values and returns the full (B, H_kv, S, D) keys to attend over.
        mask: bool (B, 1, T, S), True where a query may attend; None means plain causal over T new tokens.
        logits_at: (B,) index of the one position per row whose logits are wanted (prefill); the head,
            the largest matmul, then runs on B rows instead of B*T. Returns (B, V) in that case, else (B, T, V).
        """
        B = tokens.shape[0]
        h = self.features(tokens, positions=positions, cache=cache, mask=mask)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at]  # (B, dim)
        return self.head(h)
