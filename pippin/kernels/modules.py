"""Swap the model's modules onto pippin's CPU kernels, in place, without touching parameters or names.

`use_kernels_(model)` re-classes `nn.Linear` / `TiedLinear`, `RMSNorm`, `MLP` and `Attention` to subclasses
whose forward calls the kernels when it pays (a few rows: decode) and the original PyTorch code
otherwise (prefill is GEMM-bound and MKL is good at it). q|k|v and gate|up weights are re-laid into one
buffer each, with the original parameters becoming views into it, so one matvec replaces two or three
and no memory is added. State dicts, module names and LoRA targets are unchanged; a wrapped (LoRA) or
replaced projection makes the fused path step aside. `use_kernels_(model, enable=False)` restores the
reference classes. Every fast path is tested against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pippin.kernels import ops
from pippin.model.transformer import MLP, Attention, Block, RMSNorm, TiedLinear

GEMV_MAX_ROWS = 16
"""Above this many rows a matmul is compute-bound and PyTorch's GEMM wins."""


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _fuse(linears: list[nn.Module]) -> torch.Tensor | None:
    """Concatenate the weights of plain linears into one buffer and make each weight a view of it."""
    if not all(type(m) in (nn.Linear, KernelLinear) and m.bias is None for m in linears):
        return None
    fused = torch.cat([m.weight.data for m in linears]).contiguous()
    offset = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[offset : offset + n]
        offset += n
    return fused


def _still_fused(fused: torch.Tensor | None, linears: list[nn.Module]) -> bool:
    """The fused buffer is valid only while every projection is a plain kernel linear viewing it."""
    if fused is None:
        return False
    offset = 0
    for m in linears:
        if type(m) is not KernelLinear or m.weight.data_ptr() != fused[offset:].data_ptr():
            return False
        offset += m.weight.shape[0]
    return True


class KernelLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) <= GEMV_MAX_ROWS and self.bias is None:
            return ops().gemv(x, self.weight)
        return super().forward(x)


class KernelTiedLinear(TiedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) <= GEMV_MAX_ROWS:
            return ops().gemv(x, self.weight)
        return super().forward(x)


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and _rows(x) <= GEMV_MAX_ROWS:
            return ops().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class KernelMLP(MLP):
    _gate_up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > GEMV_MAX_ROWS:
            return super().forward(x)
        if _still_fused(self._gate_up, [self.gate_proj, self.up_proj]):
            gu = ops().gemv(x, self._gate_up)
            g, u = gu.split(self.gate_proj.weight.shape[0], dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops().silu_mul(g, u))


class KernelAttention(Attention):
    _qkv: torch.Tensor | None = None

    def forward(self, x, cos, sin, cache, mask):  # noqa: ANN001, ANN201 - same signature as Attention
        B, T, _ = x.shape
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if T * B > GEMV_MAX_ROWS or self.q_norm is not None or not _still_fused(self._qkv, projections):
            return super().forward(x, cos, sin, cache, mask)
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = ops().gemv(x, self._qkv)  # (B, T, (H + 2 Hkv) D)
        ops().rope_(qkv, cos.squeeze(1), sin.squeeze(1), H + Hkv, D)  # rotates q and k in place
        q, k, v = qkv.view(B, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H*, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class KernelBlock(Block):
    """The whole block in one kernel call when every part is on its plain fast path."""

    def forward(self, x, cos, sin, cache, mask):  # noqa: ANN001, ANN201 - same signature as Block
        attn, mlp = self.self_attn, self.mlp
        slots = cache.uniform_slots(attn.layer) if cache is not None and hasattr(cache, "uniform_slots") else None
        if (
            slots is None
            or _rows(x) > GEMV_MAX_ROWS
            or type(attn) is not KernelAttention
            or attn.q_norm is not None
            or type(mlp) is not KernelMLP
            or type(attn.o_proj) is not KernelLinear
            or type(mlp.down_proj) is not KernelLinear
            or type(self.input_layernorm) is not KernelRMSNorm
            or type(self.post_attention_layernorm) is not KernelRMSNorm
            or not _still_fused(attn._qkv, [attn.q_proj, attn.k_proj, attn.v_proj])
            or not _still_fused(mlp._gate_up, [mlp.gate_proj, mlp.up_proj])
        ):
            return super().forward(x, cos, sin, cache, mask)
        k, v, start = slots
        return ops().decode_block(
            x,
            self.input_layernorm.weight,
            attn._qkv,
            attn.o_proj.weight,
            self.post_attention_layernorm.weight,
            mlp._gate_up,
            mlp.down_proj.weight,
            cos.squeeze(1),
            sin.squeeze(1),
            k,
            v,
            start,
            attn.n_heads,
            attn.n_kv_heads,
            self.input_layernorm.eps,
        )


_FAST = {
    nn.Linear: KernelLinear,
    TiedLinear: KernelTiedLinear,
    RMSNorm: KernelRMSNorm,
    MLP: KernelMLP,
    Attention: KernelAttention,
    Block: KernelBlock,
}
_SLOW = {v: k for k, v in _FAST.items()}


def use_kernels_(model: nn.Module, *, enable: bool = True) -> bool:
    """Switch every eligible module to (or back from) its kernel class. Returns whether kernels are on."""
    if enable and ops() is None:
        enable = False
    table = _FAST if enable else _SLOW
    for m in model.modules():
        new = table.get(type(m))
        if new is None or (isinstance(m, nn.Linear) and m.bias is not None):
            continue
        m.__class__ = new
        if new is KernelAttention:
            m._qkv = _fuse([m.q_proj, m.k_proj, m.v_proj])
        elif new is KernelMLP:
            m._gate_up = _fuse([m.gate_proj, m.up_proj])
    return enable
