"""Prefill and decode steps: the two forward passes every generation is made of.

`prefill` runs the prompts (right-padded to one length) through the model, filling the cache, and
returns the logits at each row's last prompt token. `decode_step` feeds one new token per row at that
row's own position. `model` is the Transformer or its `FusedDecoder` (the same call). Both only move token ids
and positions; text lives in pippin.engine.stream.
The decode step can be compiled with torch.compile (`Engine(compile=True)`); the CPU kernels are usually faster.
"""

from __future__ import annotations

import torch

from pippin.engine.kv_cache import KVCache
from pippin.kernels.decoder import FusedDecoder
from pippin.model.transformer import Transformer


@torch.inference_mode()
def prefill(
    model: Transformer | FusedDecoder, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache, *, start: int | torch.Tensor = 0
) -> torch.Tensor:
    """Run prompts (B, T) right-padded, with true `lengths` (B,), from slot `start` (one for all rows, or (B,) per row: a
    chunk of each prompt after the part already in the cache); logits (B, V) at each row's last token."""
    B, T = tokens.shape
    start = torch.as_tensor(start).view(-1, 1)
    positions = (torch.arange(T) + start).expand(B, T)
    cache.begin(positions)
    logits = model(tokens, positions=positions, cache=cache, mask=cache.attention_mask(positions), logits_at=lengths - 1)
    cache.lengths = lengths + start.view(-1)
    return logits


@torch.inference_mode()
def decode_step(model: Transformer | FusedDecoder, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row (B,) at each row's next free slot; logits (B, V)."""
    positions = cache.lengths.unsqueeze(1)  # (B, 1)
    cache.begin(positions)
    logits = model(tokens.unsqueeze(1), positions=positions, cache=cache, mask=cache.attention_mask(positions))
    cache.lengths = cache.lengths + 1
    return logits[:, -1]
