"""A preallocated KV cache, owned by the engine and updated in place.

One buffer per layer of shape (B, H_kv, S_max, D) for keys and for values. The engine tells the cache
where the new tokens go (`positions`, shape (B, T)); attention then calls `update(layer, k, v)`, which
writes the new keys/values into their slots and returns a view over the filled prefix to attend over.
No concatenation, no reallocation: decode touches only the new slots. Rows may sit at different
positions (batched requests of different lengths); the causal-by-position mask from `attention_mask`
hides stale slots. Rows can be cloned (n samples that share one prefill). Follows gpt-fast's static cache, but
the cache is passed into the model rather than attached to it (nanochat, mlx-lm).

`kv8=True` stores keys and values as int8 with one fp32 absmax scale per token and head (AFM's 8-bit KV cache,
a quarter of the memory of fp32 plus 1/D for the scales); `update` quantizes the new entries and returns the
dequantized prefix, so attention sees exactly what an 8-bit cache holds. The fused decoder writes and reads
the int8 cache itself (`all_slots` hands it the scales), quantizing exactly as `quantize_kv`.

`gather(rows)` addresses any rows of the buffers (a batched prefill of prompts whose rows are not neighbours):
writes go to those rows in place, and attention reads a copy of their filled slots.
"""

from __future__ import annotations

import torch

from pippin.model.config import ModelConfig


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) fp32 -> int8 values and (...) fp32 scales, symmetric absmax per vector."""
    scale = x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    return torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


class KVCache:
    def __init__(self, cfg: ModelConfig, *, batch_size: int, max_len: int, kv8: bool = False) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        dtype = torch.int8 if kv8 else torch.float32
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.k_scale = torch.zeros(shape[:-1]) if kv8 else None
        """int8 caches: one scale per (layer, row, head, slot); None for fp32."""
        self.v_scale = torch.zeros(shape[:-1]) if kv8 else None
        self.max_len = max_len
        self.batch_size = batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        """Valid tokens per row (the next free position); the engine sets it after each step."""
        self._rows: torch.Tensor | None = None  # (B,) the buffer rows this cache addresses (None: all, in order)
        self._start: int | None = None  # all rows write at the same offset (fast path)
        self._positions: torch.Tensor | None = None  # (B, T) per-row slots otherwise
        self._end = 0  # attend over slots [0, _end)

    @property
    def kv8(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers())

    def _buffers(self) -> list[torch.Tensor]:
        """Every tensor with a (layer, row, ...) layout: k, v and, for int8, their scales."""
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.kv8 else [])

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
        if not self.kv8:
            self._store(self.k[layer], k)
            self._store(self.v[layer], v)
            return self._filled(self.k[layer]), self._filled(self.v[layer])
        out = []
        for buf, scales, x in ((self.k[layer], self.k_scale[layer], k), (self.v[layer], self.v_scale[layer], v)):
            q, scale = quantize_kv(x)
            self._store(buf, q)
            self._store(scales, scale)
            out.append(dequantize_kv(self._filled(buf), self._filled(scales)))
        return out[0], out[1]

    def _filled(self, buf: torch.Tensor) -> torch.Tensor:
        """Slots [0, end) of this cache's rows of buf (B_buf, H_kv, S[, D]): a view, or a copy for gathered rows."""
        prefix = buf[:, :, : self._end]
        return prefix if self._rows is None else prefix.index_select(0, self._rows)

    def _store(self, buf: torch.Tensor, x: torch.Tensor) -> None:
        """Write x (B, H_kv, T[, D]) into buf (B_buf, H_kv, S[, D]) at the declared slots."""
        if self._start is not None and self._rows is None:
            buf[:, :, self._start : self._start + x.shape[2]] = x
        elif self._start is not None:
            buf[self._rows, :, self._start : self._start + x.shape[2]] = x
        else:
            rows = (self._rows if self._rows is not None else torch.arange(x.shape[0])).unsqueeze(1)  # (B, 1) with (B, T)
            buf[rows, :, self._positions] = x.transpose(1, 2)

    def all_slots(self) -> tuple | None:
        """(k, v, start, row_starts, k_scale, v_scale) for the fused decoder, which writes the cache itself: the whole
        (L, B, H_kv, S, D) buffers (and (L, B, H_kv, S) scales; None for fp32); every row writes its new tokens at
        `start`, or, when rows are ragged, row b at row_starts[b]. A view over the first rows of a bigger cache
        (continuous batching) passes as is. None if a row's slots are not contiguous, or rows are gathered."""
        if self._rows is not None or not all(t[0, 0].is_contiguous() and t.stride(1) == t[0, 0].numel() for t in self._buffers()):
            return None
        ks, vs = (self.k_scale, self.v_scale) if self.kv8 else (None, None)
        if self._start is not None:
            return self.k, self.v, self._start, None, ks, vs
        return self.k, self.v, 0, self._positions[:, 0].contiguous(), ks, vs

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
    def _over(cls, buffers: list[torch.Tensor], lengths: torch.Tensor) -> KVCache:
        """A cache over existing (L, B, ...) buffers: [k, v] or [k, v, k_scale, v_scale]."""
        new = cls.__new__(cls)
        new.k, new.v = buffers[0], buffers[1]
        new.k_scale, new.v_scale = (buffers[2], buffers[3]) if len(buffers) == 4 else (None, None)
        new.lengths = lengths
        new.max_len, new.batch_size = new.k.shape[3], new.k.shape[1]
        new._rows, new._start, new._positions, new._end = None, None, None, 0
        return new

    def gather(self, rows: list[int]) -> KVCache:
        """An empty cache over the given rows of this one's buffers, in that order (neighbouring rows: a plain view)."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return self.rows(rows[0], rows[0] + len(rows))
        new = KVCache._over(self._buffers(), torch.zeros(len(rows), dtype=torch.long))
        new._rows, new.batch_size = torch.tensor(rows), len(rows)
        return new

    def first_rows(self, n: int) -> KVCache:
        """An empty cache over the first n rows of this one's buffers: a view, still updated in place."""
        return self.rows(0, n)

    def rows(self, start: int, stop: int) -> KVCache:
        """An empty cache over rows [start, stop) of this one's buffers (a view, updated in place): one request's
        row in a continuously batched cache is prefilled through it."""
        return KVCache._over([t[:, start:stop] for t in self._buffers()], torch.zeros(stop - start, dtype=torch.long))

    def copy_row(self, src: int, dst: int, n_slots: int) -> None:
        """Copy row `src`'s first n_slots slots into row `dst` (n samples sharing one prefill)."""
        for t in self._buffers():
            t[:, dst, :, :n_slots] = t[:, src, :, :n_slots]

    def branch(self, row: int, n: int, room: int) -> KVCache:
        """n copies of `row`'s filled slots, with `room` free slots after them (to try n continuations at once).
        Copies only the filled part, not the whole buffer."""
        end = int(self.lengths[row])
        out = []
        for t in self._buffers():
            new = t.new_zeros(t.shape[0], n, t.shape[2], end + room, *t.shape[4:])
            new[:, :, :, :end] = t[:, row : row + 1, :, :end]
            out.append(new)
        return KVCache._over(out, self.lengths[row : row + 1].repeat(n))

    def clone_rows(self, row: int, n: int) -> KVCache:
        """A new cache of n rows, each a copy of `row` (n samples sharing one prefill)."""
        copies = [t[:, row : row + 1].repeat(1, n, *[1] * (t.dim() - 2)) for t in self._buffers()]
        return KVCache._over(copies, self.lengths[row : row + 1].repeat(n))
