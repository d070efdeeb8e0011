"""Bit-packing of palette indices: a little-endian bitstream per row.

Index j of a row occupies bits [j*b, (j+1)*b) of that row's bytes, so 8 consecutive indices always take
exactly b bytes. The C++ LUT kernel reads them in such 8-index blocks. Rows must hold a multiple of 8
indices (every linear in the supported models does); pack pads nothing and says so if they don't.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer indices < 2**bits -> (N, K*bits/8) uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    N, K = idx.shape
    if K % 8:
        raise ValueError(f"rows must hold a multiple of 8 indices to pack, got {K}")
    if bits == 8:
        return idx.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, dtype=torch.int32)
    bitplanes = (idx.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (N, K, b), LSB first
    stream = bitplanes.reshape(N, K * bits // 8, 8)  # 8 consecutive bits per byte
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: (N, K*bits/8) uint8 -> (N, K) int64 indices."""
    if bits == 8:
        return packed.long()
    N = packed.shape[0]
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1  # (N, bytes, 8)
    planes = stream.reshape(N, k, bits)
    return (planes << torch.arange(bits, dtype=torch.int32)).sum(-1).long()
