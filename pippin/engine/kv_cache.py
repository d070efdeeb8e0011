"""A preallocated KV cache, owned by the engine and updated in place.

One buffer per layer of shape (B, H_kv, S_max, D) for keys and for values. The engine tells the cache
where the new tokens go (`positions`, shape (B, T)); attention then calls `update(layer, k, v)`, which
writes the new keys/values into their slots and returns a view over the filled prefix to attend over.
No concatenation, no reallocation: decode touches only the new slots. Rows may sit at different
positions (batched requests of different lengths); the causal-by-position mask from `attention_mask`
hides stale slots. Rows can be cloned (n samples that share one prefill). Follows gpt-fast's static cache, but the cache is passed
into the model rather than attached to it (nanochat, mlx-lm).
"""

from __future__ import annotations

import torch

from pippin.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, *, batch_size: int, max_len: int) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape)  # fp32, as the model computes; an 8-bit cache is issue #3's
        self.v = torch.zeros(shape)
        self.max_len = max_len
        self.batch_size = batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        """Valid tokens per row (the next free position); the engine sets it after each step."""
        self._start: int | None = None  # all rows write at the same offset (fast path)
        self._positions: torch.Tensor | None = None  # (B, T) per-row slots otherwise
        self._end = 0  # attend over slots [0, _end)

    def begin(self, positions: torch.Tensor) -> None:
        """Declare where this forward's T new tokens go: positions (B, T), contiguous per row."""
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end - 1} >= capacity {self.max_len}.")
        first = positions[:, 0]
        uniform = bool((first == first[0]).all())
        self._start = int(first[0]) if uniform else None
        self._positions = None if uniform else positions
        self._end = end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at the declared slots; return keys/values over [0, end)."""
        kl, vl = self.k[layer], self.v[layer]
        if self._start is not None:
            t = k.shape[2]
            kl[:, :, self._start : self._start + t] = k
            vl[:, :, self._start : self._start + t] = v
        else:
            rows = torch.arange(k.shape[0]).unsqueeze(1)  # (B, 1) broadcast with positions (B, T)
            kl[rows, :, self._positions] = k.transpose(1, 2)
            vl[rows, :, self._positions] = v.transpose(1, 2)
        return kl[:, :, : self._end], vl[:, :, : self._end]

    def block_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """(k, v, start, row_starts) of one layer for fused kernels that write the cache themselves: every row
        writes its new tokens at `start`, or, when rows are ragged (continuous batching, prompts of different
        lengths), row b at row_starts[b]; each attends over its slots up to its own position."""
        if self._start is not None:
            return self.k[layer], self.v[layer], self._start, None
        return self.k[layer], self.v[layer], 0, self._positions[:, 0].contiguous()

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Bool (B, 1, T, S) mask, True where query at position p may see slot j (j <= p).

        None when no mask is needed: a single uniform decode step (every slot < end is visible), or a
        uniform prefill from slot 0 (plain causal).
        """
        T = positions.shape[1]
        if self._positions is None and (T == 1 or self._start == 0):
            return None
        slots = torch.arange(self._end)
        return slots.view(1, 1, 1, -1) <= positions.view(positions.shape[0], 1, T, 1)

    @classmethod
    def _over(cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> KVCache:
        """A cache over existing (L, B, H_kv, S, D) buffers."""
        new = cls.__new__(cls)
        new.k, new.v, new.lengths = k, v, lengths
        new.max_len, new.batch_size = k.shape[3], k.shape[1]
        new._start, new._positions, new._end = None, None, 0
        return new

    def first_rows(self, n: int) -> KVCache:
        """An empty cache over the first n rows of this one's buffers: a view, still updated in place."""
        return self.rows(0, n)

    def rows(self, start: int, stop: int) -> KVCache:
        """An empty cache over rows [start, stop) of this one's buffers (a view, updated in place): one request's
        row in a continuously batched cache is prefilled through it."""
        return KVCache._over(self.k[:, start:stop], self.v[:, start:stop], torch.zeros(stop - start, dtype=torch.long))

    def branch(self, row: int, n: int, room: int) -> KVCache:
        """n copies of `row`'s filled slots, with `room` free slots after them (to try n continuations at once).
        Copies only the filled part, not the whole buffer."""
        end = int(self.lengths[row])
        k, v = (t.new_zeros(t.shape[0], n, t.shape[2], end + room, t.shape[4]) for t in (self.k, self.v))
        k[:, :, :, :end] = self.k[:, row : row + 1, :, :end]
        v[:, :, :, :end] = self.v[:, row : row + 1, :, :end]
        return KVCache._over(k, v, self.lengths[row : row + 1].repeat(n))

    def clone_rows(self, row: int, n: int) -> KVCache:
        """A new cache of n rows, each a copy of `row` (n samples sharing one prefill)."""
        k, v = (t[:, row : row + 1].repeat(1, n, 1, 1, 1) for t in (self.k, self.v))
        return KVCache._over(k, v, self.lengths[row : row + 1].repeat(n))
