"""Compressed modules: `PalettizedLinear` (LUT weights) and the 8-bit tied embedding / output head.

Each keeps only the compressed tensors (packed indices + fp16 LUTs; int8 rows + scales) and has a slow
reference forward (dequantize, then F.linear / lookup) and a fast one through pippin's C++ kernels for
decode-sized inputs (the dense matrix is never built). They are swapped in from outside by module
name (see pippin.quant.compress); quant never imports the model. A palettized linear may carry an online input
rotation (QuaRot's R4): it stores W R and computes (x R)(W R)^T, the same function as W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pippin.kernels import ops
from pippin.quant.pack import pack, unpack
from pippin.quant.palettize import Palette
from pippin.quant.rotate import HadamardTransform

FAST_MAX_ROWS = 16
ACT8_BLOCK = 64
"""Activations per scale under act8 (the kernel's block)."""


class PalettizedLinear(nn.Module):
    """y = x W^T with W[n, k] = lut[n // group_size][idx[n, k]], times row_scale[n] if it has row scales; no bias.

    Row scales (pippin.quant.palettize) let the rows that share a LUT differ in norm; they cost one fp16 per row and,
    in the kernels, nothing: they are multiplied into the per-row output scale the act8 kernels apply anyway (the
    int8 LUT's scale), or into the fp32 LUT kernel's outputs.

    With `in_signs` (int8 ±1, (in_features,)) the LUTs hold W' = W R, R = rotation(in_signs) (pippin.quant.rotate), and
    y = (x R) W'^T = x W^T: every forward path rotates x first, and `dequantize()` returns W = W' R^T, the weight in
    the input's own basis, for whatever reads the dense weight (adapters' residual start, export, the reference)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        act8: bool = False,
        row_scale: bool = False,
        rotate_input: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.act8 = act8
        """Dynamic 8-bit activations (and an int8 copy of the LUT): the integer kernels."""
        self._lut_i8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("packed", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("lut", torch.zeros(out_features // group_size, 2**bits, dtype=torch.float16))
        self.register_buffer("row_scale", torch.ones(out_features, dtype=torch.float16) if row_scale else None)
        self._out_scale: torch.Tensor | None = None
        self._out_scale_src: tuple[int, ...] | None = None
        self._lut32: torch.Tensor | None = None
        self._lut_src: tuple[int, int] | None = None
        self._lut_src_i8: tuple[int, int] | None = None
        self._w_kernel: torch.Tensor | None = None
        self._w_kernel_src: tuple[int, ...] | None = None
        self.register_buffer("in_signs", torch.ones(in_features, dtype=torch.int8) if rotate_input else None)
        self.index_cache: torch.Tensor | None = None
        """(N, K) int64 indices, unpacked once, while the LUTs train (pippin.train.lut_tuning sets and clears it)."""
        self._rotation: tuple[tuple[int, int], HadamardTransform] | None = None

    @classmethod
    def from_palette(cls, p: Palette, *, in_signs: torch.Tensor | None = None) -> PalettizedLinear:
        """The layer of a palette; with in_signs, a palette of W R (R = rotation(in_signs)) for an input-rotated layer."""
        N, K = p.idx.shape
        m = cls(K, N, bits=p.bits, group_size=p.group_size, row_scale=p.row_scale is not None, rotate_input=in_signs is not None)
        m._load_palette(p)
        if in_signs is not None:
            m.in_signs.copy_(in_signs)
        return m

    def _load_palette(self, p: Palette) -> None:
        self.packed.copy_(pack(p.idx, p.bits))
        self.lut.copy_(p.lut)
        if p.row_scale is not None:
            self.row_scale.copy_(p.row_scale)

    def input_rotation(self) -> HadamardTransform | None:
        """x -> x R for `in_signs` (cached; rebuilt if the buffer changes), or None for a layer without one."""
        if self.in_signs is None:
            return None
        key = (id(self.in_signs), self.in_signs._version)
        if self._rotation is None or self._rotation[0] != key:
            self._rotation = (key, HadamardTransform(self.in_signs))
        return self._rotation[1]

    def dequantize(self) -> torch.Tensor:
        """The dense (N, K) fp32 weight in the input's own basis (reference path; kernels never build it in decode)."""
        rot = self.input_rotation()
        w = self.stored_weight()
        return w if rot is None else rot(w, inverse=True)

    def stored_weight(self) -> torch.Tensor:
        """The LUT weight as stored (W R for an input-rotated layer), dense (N, K) fp32; differentiable in the LUT and
        row scales when they are being trained (pippin.train.lut_tuning)."""
        k = ops()
        if k is not None and not self.tuning():
            w = k.lut_dequant(self.packed, self.lut, self.bits, self.group_size)
        else:
            idx = self.index_cache if self.index_cache is not None else unpack(self.packed, self.bits, self.in_features)
            w = self.lut.float().repeat_interleave(self.group_size, dim=0).gather(1, idx)
        return w if self.row_scale is None else w * self.row_scale.float()[:, None]

    def tuning(self) -> bool:
        """Gradients flow to the LUT or the row scales: only the plain PyTorch paths (the kernels have no backward)."""
        rows = self.row_scale is not None and self.row_scale.requires_grad
        return torch.is_grad_enabled() and (self.lut.requires_grad or rows)

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (shape, dtype)
        return self.dequantize()

    def lut32(self) -> torch.Tensor:
        """The LUT in fp32, as the kernels read it (cached; rebuilt if the LUT buffer is replaced)."""
        key = (id(self.lut), self.lut._version)
        if self._lut32 is None or self._lut_src != key:
            self._lut32, self._lut_src = self.lut.float(), key
        return self._lut32

    def lut_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, max(16, 2**b)) int8 LUT (entries past 2**b are zero) and its (G,) fp32 absmax scales, for act8 (cached).

        At most 4 bits, 16 bytes per group whatever the width: the kernel looks up 32 indices with one byte shuffle."""
        key = (id(self.lut), self.lut._version)
        if self._lut_i8 is None or self._lut_src_i8 != key:
            lut = self.lut.float()
            scale = lut.abs().amax(1).clamp_min(1e-12) / 127.0
            q = torch.round(lut / scale[:, None]).to(torch.int8)
            self._lut_i8 = (F.pad(q, (0, max(0, 16 - q.shape[1]))), scale)
            self._lut_src_i8 = key
        return self._lut_i8

    def act8_weights(self) -> torch.Tensor | None:
        """The act8 kernel's own copy of the weights, held in memory next to the stored indices (cached; rebuilt when
        the LUT or the indices change), for the widths whose stored form it reads slowly:
        - 3 bits: the indices widened to 4-bit nibbles (N, K/2), run by the 4-bit kernel (a 3-bit LUT fits its
          16-entry shuffle). Unpacking 3-bit fields costs twice the 4-bit kernel's instructions on this CPU class
          (90 vs 47 ns per 576-weight row: `benchmarks/kernels.py --rows` before the widening), while the weights
          stream at half a byte instead of 3/8.
        - 6 and 8 bits: (N, K) uint8, each weight's int8 LUT value + 128. Their 64 or 256 entries do not fit one
          byte shuffle, so the kernel reads the looked-up values: a byte per weight, the cheapest dot product there is.
        None at 2 and 4 bits, which the kernel reads as stored."""
        if self.bits in (2, 4):
            return None
        key = (id(self.lut), self.lut._version, id(self.packed), self.packed._version)
        if self._w_kernel is None or self._w_kernel_src != key:
            k, g, K = ops(), self.group_size, self.in_features
            # A few hundred rows at a time: whole-matrix temporaries (fp32 or int64, 4-8x the result), interleaved
            # with the results kept, left the allocator holding hundreds of MB after expanding a model's layers.
            step = max(g, (1 << 17) // K // g * g)
            if self.bits == 3:
                w = torch.empty(self.out_features, K // 2, dtype=torch.uint8)
                for r0 in range(0, self.out_features, step):
                    w[r0 : r0 + step] = pack(unpack(self.packed[r0 : r0 + step], 3, K), 4)
            else:
                lut_u = self.lut_int8()[0][:, : 2**self.bits].float() + 128  # (G, 2**b), exact in fp32
                w = torch.empty(self.out_features, K, dtype=torch.uint8)
                for r0 in range(0, self.out_features, step):
                    r1 = min(r0 + step, self.out_features)
                    part = lut_u[r0 // g : r1 // g]
                    if k is not None:
                        rows = k.lut_dequant(self.packed[r0:r1], part, self.bits, g)
                    else:
                        rows = part.repeat_interleave(g, dim=0).gather(1, unpack(self.packed[r0:r1], self.bits, K))
                    w[r0:r1] = rows.to(torch.uint8)
            self._w_kernel, self._w_kernel_src = w, key
        return self._w_kernel

    def act8_scale(self) -> torch.Tensor:
        """The act8 kernels' output scales: the int8 LUT's (G,) scales, or with row scales their (N,) products with
        them (cached)."""
        scale = self.lut_int8()[1]
        if self.row_scale is None:
            return scale
        key = (id(self.lut), self.lut._version, id(self.row_scale), self.row_scale._version)
        if self._out_scale is None or self._out_scale_src != key:
            self._out_scale = scale.repeat_interleave(self.group_size) * self.row_scale.float()
            self._out_scale_src = key
        return self._out_scale

    def act8_kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(weights, int8 LUT, output scales, kernel bits) for lut_gemv_act8 and the fused block: the packed indices
        at 2 and 4 bits, 4-bit nibbles at 3 (kernel bits 4), the expanded bytes (kernel bits 8) at 6 and 8."""
        lut_i8, scale = self.lut_int8()[0], self.act8_scale()
        if self.bits in (2, 4):
            return self.packed, lut_i8, scale, self.bits
        return self.act8_weights(), lut_i8, scale, 4 if self.bits == 3 else 8

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, tuple[torch.Tensor, torch.Tensor] | None]:
        """(weights, LUT, output scales or None, kernel bits, group, input rotation) for pippin.kernels' FusedDecoder:
        the act8 kernel's arguments (an int8 LUT) where act8 runs on the kernels, else the packed indices, the fp32 LUT
        and the row scales (None without); the rotation as (sign bits (ceil(K / 8),) uint8, fp32 Paley block) for
        `hadamard_rows`, or None."""
        rot = self.input_rotation()
        rotation = None if rot is None else (rot.sign_bits, rot.block)
        if self.uses_act8_kernel():
            w, lut_i8, scale, bits = self.act8_kernel_args()
            return w, lut_i8, scale, bits, self.group_size, rotation
        return self.packed, self.lut32(), self.row_scale32(), self.bits, self.group_size, rotation

    def row_scale32(self) -> torch.Tensor | None:
        return None if self.row_scale is None else self.row_scale.float()

    def act8_applies(self) -> bool:
        """act8 covers layers whose input width is a multiple of 64 (one activation scale per 64); others stay fp32."""
        return self.act8 and self.bits in (2, 3, 4, 6, 8) and self.in_features % ACT8_BLOCK == 0

    def uses_act8_kernel(self) -> bool:
        return self.act8_applies() and ops() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ops()
        rot = self.input_rotation()
        if rot is not None:
            x = rot(x)  # the LUTs hold W R
        if self.act8_applies():
            # The integer kernel for any row count (prefill included: it beats dequantizing for a GEMM up to 512
            # rows); the differentiable reference when gradients must flow through x (adapter training).
            if k is not None and not (x.requires_grad and torch.is_grad_enabled()):
                w, lut_i8, scale, bits = self.act8_kernel_args()
                return k.lut_gemv_act8(x, w, lut_i8, scale, bits, self.group_size)
            return self._act8_reference(x)
        if k is not None and x.numel() // x.shape[-1] <= FAST_MAX_ROWS and not self.tuning():
            return k.lut_gemv(x, self.packed, self.lut32(), self.bits, self.group_size, self.row_scale32())
        return F.linear(x, self.stored_weight())

    def _act8_reference(self, x: torch.Tensor) -> torch.Tensor:
        """act8 numerics in plain PyTorch: 7-bit activations with one scale per 64 times the int8 LUT (as the kernel)."""
        xq = quantize_act8_reference(x)
        lut_i8, lut_scale = self.lut_int8()
        lut = (lut_i8.float() * lut_scale[:, None])[:, : 2**self.bits].contiguous()
        k = ops()
        if k is not None:  # the same weights, built by the (tested) dequantization kernel: prefill stays GEMM-fast
            w = k.lut_dequant(self.packed, lut, self.bits, self.group_size)
        else:
            w = lut.repeat_interleave(self.group_size, dim=0).gather(1, unpack(self.packed, self.bits, self.in_features))
        return F.linear(xq, w if self.row_scale is None else w * self.row_scale.float()[:, None])

    def nbytes(self) -> int:
        rows = 0 if self.row_scale is None else self.row_scale.numel() * 2
        return self.packed.numel() + self.lut.numel() * 2 + rows + (0 if self.in_signs is None else self.in_signs.numel())

    def extra_repr(self) -> str:
        rows = ", row_scale" if self.row_scale is not None else ""
        rot = ", rotate_input=True" if self.in_signs is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, act8={self.act8}{rows}{rot}"


class PalettizedEmbedding(PalettizedLinear):
    """A tied embedding palettized like a linear (V, dim): rows looked up for tokens, and the whole matrix as the
    head through `PalettizedTiedHead`. For small models whose embedding is a large share of the weights
    (SmolLM2-135M: 21 %), 4-6 bits here leave far more bits for the transformer layers than AFM's 8.

    Row scales matter most here: token rows differ in norm by an order of magnitude."""

    def __init__(self, num_embeddings: int, dim: int, *, bits: int, group_size: int, act8: bool = False, row_scale: bool = False) -> None:
        super().__init__(dim, num_embeddings, bits=bits, group_size=group_size, act8=act8, row_scale=row_scale)

    @classmethod
    def from_palette(cls, p: Palette) -> PalettizedEmbedding:
        N, K = p.idx.shape
        m = cls(N, K, bits=p.bits, group_size=p.group_size, row_scale=p.row_scale is not None)
        m._load_palette(p)
        return m

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        # (n, dim) LUT indices
        idx = self.index_cache[flat] if self.index_cache is not None else unpack(self.packed[flat], self.bits, self.in_features)
        rows = self.lut[flat // self.group_size].float().gather(1, idx)
        if self.row_scale is not None:
            rows = rows * self.row_scale[flat].float()[:, None]
        return rows.view(*tokens.shape, self.in_features)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ E^T: the tied output head."""
        return PalettizedLinear.forward(self, x)


class PalettizedTiedHead(nn.Module):
    """The output head of a tied model whose embedding is `PalettizedEmbedding` (a reference, not a copy)."""

    def __init__(self, embedding: PalettizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding.project(x)


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

    def __init__(self, embedding: Int8Embedding, *, act8: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference: the rows are stored once
        self.act8 = act8
        """Dynamic 8-bit per-token activations: an int8 x int8 dot product (the head is a fifth of this model's weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._embedding
        k = ops()
        # The kernels have no backward: a pass that needs the gradient to x (an adapter below) takes the reference.
        fast = k is not None and x.numel() // x.shape[-1] <= FAST_MAX_ROWS and not (x.requires_grad and torch.is_grad_enabled())
        if self.act8 and e.qweight.shape[1] % 32 == 0:
            if fast:
                return k.gemv_i8_act8(x, e.qweight, e.scale)
            return F.linear(quantize_act8_rows_reference(x), e.dequantize())
        if fast:
            return k.gemv_i8(x, e.qweight, e.scale)
        return F.linear(x, e.dequantize())


def quantize_act8_reference(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the palettized act8 kernel rounds it, and back: 7-bit integers ([-63, 63]) with one absmax scale
    per 64 consecutive features (llama.cpp's Q8 activations use a scale per 32: per-block scales keep one outlier
    from flattening a whole token). 7 bits, so that the kernel's unsigned 8-bit LUT times x never saturates."""
    blocks = x.unflatten(-1, (-1, ACT8_BLOCK))
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 63.0
    return (torch.round(blocks / scale) * scale).flatten(-2)


def quantize_act8_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8 head's act8 kernel rounds it, and back: int8 with one absmax scale per token."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale) * scale
