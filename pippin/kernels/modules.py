"""Swap the model's modules onto pippin's CPU kernels, in place, without touching parameters or names.

`use_kernels_(model)` re-classes `nn.Linear` / `TiedLinear`, `RMSNorm`, `MLP` and `Block` to subclasses
whose forward calls the kernels when it pays (a few rows: decode) and the original PyTorch code
otherwise (prefill is GEMM-bound and MKL is good at it). `KernelBlock` runs a whole decoder block in one
kernel call when every projection is dense (`KernelLinear`) or palettized (anything with `packed`, `lut`
and `bits`, i.e. pippin.quant's `PalettizedLinear`, recognised by shape so this package does not import
quant), optionally wrapped in a LoRA adapter (anything with `base`, `lora_A`, `lora_B`, `lora_scale` and
`routing`: pippin.adapters' `LoRALinear`, whose per-row slots run in the same call), and the cache gives
it slots (all rows at one offset, or each row at its own: continuous batching, prompts of different lengths);
anything else (training, no cache) takes the module-by-module path, as do QK-norm models. State dicts, names
and LoRA targets are unchanged; `use_kernels_(model, enable=False)` restores the reference classes. Every fast
path is tested against the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from pippin.kernels import ops
from pippin.model.transformer import MLP, Block, RMSNorm, TiedLinear

GEMV_MAX_ROWS = 16
"""Above this many rows a matmul is compute-bound and PyTorch's GEMM wins."""


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _small_fp32(x: torch.Tensor) -> bool:
    """Decode-sized fp32 input: what the kernels are built for."""
    return x.dtype == torch.float32 and _rows(x) <= GEMV_MAX_ROWS


class KernelLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _small_fp32(x) and self.bias is None:
            return ops().gemv(x, self.weight)
        return super().forward(x)


class KernelTiedLinear(TiedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _small_fp32(x):
            return ops().gemv(x, self.weight)
        return super().forward(x)


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _small_fp32(x):
            return ops().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class KernelMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _small_fp32(x):
            return self.down_proj(ops().silu_mul(self.gate_proj(x), self.up_proj(x)))
        return super().forward(x)


def _projection(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, int] | None:
    """(weight or packed indices, LUT, int8-LUT scale, bits, group) for the fused block; None if it cannot run it."""
    if type(m) is KernelLinear:
        return m.weight, None, None, 0, 0
    if all(hasattr(m, a) for a in ("packed", "lut", "bits", "group_size", "lut32", "uses_act8_kernel")):
        if m.uses_act8_kernel():
            lut_i8, scale = m.lut_int8()
            return m.packed, lut_i8, scale, m.bits, m.group_size
        return m.packed, m.lut32(), None, m.bits, m.group_size
    return None


def _lora(m: nn.Module) -> tuple[nn.Module, tuple | None]:
    """(base module, (A, B, scale, row slots) or None) for a LoRA wrapper; (m, None) for anything else."""
    if not all(hasattr(m, a) for a in ("base", "lora_A", "lora_B", "lora_scale", "routing")):
        return m, None
    r = m.routing
    if r.index is None and r.slot is None:
        return m.base, None
    if m.lora_A.dtype != torch.float16 or torch.is_grad_enabled():
        return m, None  # trainable fp32 adapters: the autograd path
    idx = r.index if r.index is not None else torch.tensor([r.slot])
    return m.base, (m.lora_A, m.lora_B, m.lora_scale, idx)


class KernelBlock(Block):
    """The whole block in one kernel call when every part is on a kernel-backed path."""

    def forward(self, x, cos, sin, cache, mask):  # noqa: ANN001, ANN201 - same signature as Block
        attn, mlp = self.self_attn, self.mlp
        slots = cache.block_slots(attn.layer) if cache is not None and hasattr(cache, "block_slots") else None
        if (
            slots is None
            or not _small_fp32(x)
            or attn.q_norm is not None
            or type(self.input_layernorm) is not KernelRMSNorm
            or type(self.post_attention_layernorm) is not KernelRMSNorm
        ):
            return super().forward(x, cos, sin, cache, mask)
        mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        loras = [_lora(m) for m in mods]
        projs = [_projection(base) for base, _ in loras]
        groups = {p[4] for p in projs if p is not None and p[3]}
        if any(p is None for p in projs) or len(groups) > 1:
            return super().forward(x, cos, sin, cache, mask)
        k, v, start, row_starts = slots
        lo = [extra for _, extra in loras]
        idx = next((e[3] for e in lo if e is not None), None)
        if idx is not None and idx.numel() > 1 and idx.numel() != x.shape[0]:
            return super().forward(x, cos, sin, cache, mask)
        return ops().decode_block(
            x, self.input_layernorm.weight, self.post_attention_layernorm.weight,
            [p[0] for p in projs], [p[1] for p in projs], [p[2] for p in projs], [p[3] for p in projs],
            groups.pop() if groups else 1,
            cos.squeeze(1), sin.squeeze(1), k, v, start, attn.n_heads, attn.n_kv_heads, self.input_layernorm.eps,
            [e and e[0] for e in lo], [e and e[1] for e in lo], [e and e[2] for e in lo], idx, row_starts,
        )  # fmt: skip


_FAST = {nn.Linear: KernelLinear, TiedLinear: KernelTiedLinear, RMSNorm: KernelRMSNorm, MLP: KernelMLP, Block: KernelBlock}
_SLOW = {v: k for k, v in _FAST.items()}


def use_kernels_(model: nn.Module, *, enable: bool = True) -> bool:
    """Switch every eligible module to (or back from) its kernel class. Returns whether kernels are on."""
    if enable and ops() is None:
        enable = False
    table = _FAST if enable else _SLOW
    for m in model.modules():
        new = table.get(type(m))
        if new is not None and not (isinstance(m, nn.Linear) and m.bias is not None):
            m.__class__ = new
    return enable
