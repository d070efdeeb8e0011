"""Compressed modules: `PalettizedLinear` (LUT weights) and the 8-bit tied embedding / output head.

Each keeps only the compressed tensors (packed indices + fp16 LUTs; int8 rows + scales) and has a slow
reference forward (dequantize, then F.linear / lookup) and a fast one through pippin's C++ kernels for
decode-sized inputs (the dense matrix is never built). They are swapped in from outside by module
name (see pippin.quant.compress); quant never imports the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pippin.kernels import ops
from pippin.quant.pack import pack, unpack
from pippin.quant.palettize import Palette

FAST_MAX_ROWS = 16


class PalettizedLinear(nn.Module):
    """y = x W^T with W[n, k] = lut[n // group_size][idx[n, k]]; no bias."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("lut", torch.zeros(out_features // group_size, 2**bits, dtype=torch.float16))
        self._lut32: torch.Tensor | None = None

    @classmethod
    def from_palette(cls, p: Palette) -> PalettizedLinear:
        N, K = p.idx.shape
        m = cls(K, N, bits=p.bits, group_size=p.group_size)
        m.packed.copy_(pack(p.idx, p.bits))
        m.lut.copy_(p.lut)
        return m

    def dequantize(self) -> torch.Tensor:
        """The dense (N, K) fp32 weight (reference path; kernels never build it during decode)."""
        k = ops()
        if k is not None:
            return k.lut_dequant(self.packed, self.lut, self.bits, self.group_size)
        idx = unpack(self.packed, self.bits, self.in_features)
        return self.lut.float().repeat_interleave(self.group_size, dim=0).gather(1, idx)

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (shape, dtype)
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ops()
        if k is not None and x.numel() // x.shape[-1] <= FAST_MAX_ROWS:
            if self._lut32 is None or self._lut32.shape != self.lut.shape:
                self._lut32 = self.lut.float()
            return k.lut_gemv(x, self.packed, self._lut32, self.bits, self.group_size)
        return F.linear(x, self.dequantize())

    def nbytes(self) -> int:
        return self.packed.numel() + self.lut.numel() * 2

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one fp32 scale per row (symmetric, absmax)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Embedding:
        m = cls(*w.shape)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        m.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        m.scale.copy_(scale)
        return m

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.qweight[tokens].float() * self.scale[tokens].unsqueeze(-1)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * 4


class Int8TiedHead(nn.Module):
    """The output head of a tied model whose embedding is `Int8Embedding`: logits from the int8 rows."""

    def __init__(self, embedding: Int8Embedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference: the rows are stored once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._embedding
        k = ops()
        if k is not None and x.numel() // x.shape[-1] <= FAST_MAX_ROWS:
            return k.gemv_i8(x, e.qweight, e.scale)
        return F.linear(x, e.dequantize())
