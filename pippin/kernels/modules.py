"""Swap the model's modules onto pippin's CPU kernels, in place, without touching parameters or names.

`use_kernels_(model)` re-classes `nn.Linear` / `TiedLinear`, `RMSNorm`, `MLP` and `Block` to subclasses
whose forward calls the kernels when it pays (a few rows: decode) and the original PyTorch code
otherwise (prefill is GEMM-bound and MKL is good at it). `KernelBlock` runs a whole decoder block in one
kernel call when every projection is dense (`KernelLinear`) or palettized (anything with `packed`, `lut`
and `bits`, i.e. pippin.quant's `PalettizedLinear`, recognised by shape so this package does not import
quant), optionally wrapped in a LoRA adapter (anything with `base`, `lora_A`, `lora_B`, `lora_scale` and
`routing`: pippin.adapters' `LoRALinear`, whose per-row slots run in the same call), and the cache gives
it slots (all rows at one offset, or each row at its own: continuous batching, prompts of different lengths);
anything else (training, no cache) takes the module-by-module path, as do QK-norm models. `KernelTransformer`
goes one step further for decode: when every block can run fused, all blocks of a step run in one call
(`DecodePlan`), whose per-layer arguments (and LoRA slot banks) are built once and kept in C++ (on a 135M
model, Python and argument conversion cost as much as the matvecs); with one token per row that call runs all
layers in a single parallel region (one fork/join per step instead of five per layer, which had left the second
core waiting a third of the time), adapters routed per row included. The cached arguments are rebuilt when a
module in the blocks, a LUT, an index, weight or LoRA tensor, or an act8 flag changes. Trainable (fp32)
adapters take the module path. State dicts, names and LoRA targets are unchanged;
`use_kernels_(model, enable=False)` restores the reference classes. Every fast path is tested against the
reference.
"""

from __future__ import annotations

import torch
from torch import nn

from pippin.kernels import ops
from pippin.model.transformer import MLP, Block, RMSNorm, TiedLinear, Transformer

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
            w, lut_i8, scale, bits = m.act8_kernel_args()
            return w, lut_i8, scale, bits, m.group_size
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


_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip


class _BlockPlan:
    """The fused block's per-layer arguments that do not change from token to token (weights, LUTs, bits,
    norms), built once and reused: rebuilding them costs more Python time per token than the kernel's
    own work on a small model. It is rebuilt when a projection module, a LUT or an act8 flag changes."""

    __slots__ = ("mods", "luts", "flags", "args", "wrapped", "ok")

    def __init__(self, block: KernelBlock, mods: tuple[nn.Module, ...]) -> None:
        self.mods = mods
        bases = [m.base if _is_lora(m) else m for m in mods]
        self.wrapped = [i for i, m in enumerate(mods) if _is_lora(m)]
        self.luts = [(t, t._version) for b in bases for t in (getattr(b, "lut", None), getattr(b, "packed", None)) if t is not None]
        self.flags = [(b, b.act8) for b in bases if hasattr(b, "act8")]
        projs = [_projection(b) for b in bases]
        groups = {p[4] for p in projs if p is not None and p[3]}
        attn = block.self_attn
        self.ok = (
            all(p is not None for p in projs)
            and len(groups) <= 1
            and attn.q_norm is None
            and type(block.input_layernorm) is KernelRMSNorm
            and type(block.post_attention_layernorm) is KernelRMSNorm
        )
        self.args = (
            (
                block.input_layernorm.weight, block.post_attention_layernorm.weight,
                [p[0] for p in projs], [p[1] for p in projs], [p[2] for p in projs], [p[3] for p in projs],
                groups.pop() if groups else 1,
            ),
            (attn.n_heads, attn.n_kv_heads, block.input_layernorm.eps),
        ) if self.ok else None  # fmt: skip

    def valid(self, mods: tuple[nn.Module, ...]) -> bool:
        return mods == self.mods and all(t._version == v for t, v in self.luts) and all(m.act8 == a for m, a in self.flags)


class _Cached:
    """Kernel arguments cached on a module: rebuilt on demand, so never deep-copied or pickled with it (a copy
    would point at the original's tensors, and the C++ plan cannot be pickled)."""

    __slots__ = ("value",)

    def __init__(self, value: object = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> _Cached:
        return _Cached()

    def __reduce__(self) -> tuple:
        return (_Cached, ())


def _is_lora(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("base", "lora_A", "lora_B", "lora_scale", "routing"))


class KernelBlock(Block):
    """The whole block in one kernel call when every part is on a kernel-backed path."""

    def _plan(self) -> _BlockPlan:
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        mods = tuple((attn if owner == "self_attn" else mlp)._modules[name] for owner, name in _PROJ)
        cached = self.__dict__.get("_kernel_plan")
        plan = cached.value if cached is not None else None
        if plan is None or not plan.valid(mods):
            plan = _BlockPlan(self, mods)
            self.__dict__["_kernel_plan"] = _Cached(plan)
        return plan

    def forward(self, x, cos, sin, cache, mask):  # noqa: ANN001, ANN201 - same signature as Block
        slots = cache.block_slots(self.self_attn.layer) if cache is not None and hasattr(cache, "block_slots") else None
        if slots is None or not _small_fp32(x):
            return super().forward(x, cos, sin, cache, mask)
        plan = self._plan()
        if not plan.ok:
            return super().forward(x, cos, sin, cache, mask)
        lo: list[tuple | None] = [None] * 7
        for i in plan.wrapped:
            base, extra = _lora(plan.mods[i])
            if base is plan.mods[i]:  # trainable adapter (autograd): the module path
                return super().forward(x, cos, sin, cache, mask)
            lo[i] = extra
        idx = next((e[3] for e in lo if e is not None), None)
        if idx is not None and idx.numel() > 1 and idx.numel() != x.shape[0]:
            return super().forward(x, cos, sin, cache, mask)
        k, v, start, row_starts, k_scale, v_scale = slots
        (norm1, norm2, weights, luts, scales, bits, group), (n_heads, n_kv_heads, eps) = plan.args
        return ops().decode_block(
            x, norm1, norm2, weights, luts, scales, bits, group,
            cos.squeeze(1), sin.squeeze(1), k, v, start, n_heads, n_kv_heads, eps,
            [e and e[0] for e in lo], [e and e[1] for e in lo], [e and e[2] for e in lo], idx, row_starts, k_scale, v_scale,
        )  # fmt: skip


class KernelTransformer(Transformer):
    """A decode step's blocks in one kernel call (`DecodePlan`) when every block runs fused and no adapter is active.

    The per-layer arguments are handed to C++ once and kept there; a step then costs one call from Python
    instead of one per layer (about 40 us of argument conversion and module dispatch each on this model).
    Anything else (prefill, training, active adapters, a block on the module path) runs the blocks one by one."""

    def features(self, tokens, *, positions=None, cache=None, mask=None):  # noqa: ANN001, ANN201 - as Transformer
        slots = cache.all_slots() if positions is not None and hasattr(cache, "all_slots") else None
        found = self._decode_plan() if slots is not None and tokens.numel() <= GEMV_MAX_ROWS and not torch.is_grad_enabled() else None
        if found is None:
            return super().features(tokens, positions=positions, cache=cache, mask=mask)
        watch, plan = found
        idx = watch.adapter_slots()
        if idx is not None and (not watch.routes or idx.numel() not in (1, tokens.shape[0])):
            return super().features(tokens, positions=positions, cache=cache, mask=mask)
        h = self.embed_tokens(tokens)
        if h.dtype != torch.float32:
            return super().features(tokens, positions=positions, cache=cache, mask=mask)
        return plan.forward(h, self.rope_cos[positions], self.rope_sin[positions], *slots, idx)

    def _decode_plan(self):  # noqa: ANN202 - (_PlanWatch, torch.classes.pippin.DecodePlan) or None
        cached = getattr(self.__dict__.get("_kernel_decode_plan"), "value", None)
        if cached is not None and cached[0].fresh():
            return cached
        plans = []
        for block in self.layers._modules.values():
            if type(block) is not KernelBlock:
                return None
            p = block._plan()
            if not p.ok:
                return None
            plans.append(p)
        per_layer = [p.args for p in plans]
        # Each projection's LoRA slot bank (fp16 inference slots), for steps that route adapters.
        loras = [_lora_bank(m) for p in plans for m in p.mods]
        attn = self.layers[0].self_attn
        plan = torch.classes.pippin.DecodePlan(
            [a[0][0] for a in per_layer], [a[0][1] for a in per_layer],
            [w for a in per_layer for w in a[0][2]], [t for a in per_layer for t in a[0][3]], [t for a in per_layer for t in a[0][4]],
            [b for a in per_layer for b in a[0][5]], [a[0][6] for a in per_layer],
            attn.n_heads, attn.n_kv_heads, self.layers[0].input_layernorm.eps,
            [lo and lo[0] for lo in loras], [lo and lo[1] for lo in loras], [lo and lo[2] for lo in loras],
        )  # fmt: skip
        watch = _PlanWatch(self, plans)
        mods = [m for p in plans for m in p.mods]
        watch.routes = plan.routes_adapters() and all(lo is not None for lo, m in zip(loras, mods) if _is_lora(m))
        self.__dict__["_kernel_decode_plan"] = _Cached((watch, plan))
        return watch, plan


def _lora_bank(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A LoRA wrapper's (A, B, scale) slot stacks when the kernels can run them (fp16 inference slots), else None."""
    if not _is_lora(m) or m.lora_A.dtype != torch.float16 or m.lora_A.requires_grad:
        return None
    return m.lora_A, m.lora_B, m.lora_scale


class _PlanWatch:
    """Whether a model's decode plan still matches the model, checked every step in flat comparisons (a per-block
    walk cost 0.3 ms a token, 3 % of a step): the same block, attention, MLP, norm and projection modules in their
    slots, the same LUT, index, weight and LoRA tensors (LUTs and indices at unchanged versions), the same act8
    flags. Which adapter slot each row uses is read per step (`adapter_slots`)."""

    __slots__ = ("slots", "ids", "tensors", "versions", "flagged", "flags", "routing", "routes")

    def __init__(self, model: KernelTransformer, plans: list[_BlockPlan]) -> None:
        self.slots: list[tuple[dict, str]] = []  # (a module's _modules, _parameters or _buffers, name): the same object
        for name, block in model.layers._modules.items():
            self.slots += [(model.layers._modules, name)]
            self.slots += [(block._modules, m) for m in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")]
            self.slots += [(block._modules[m]._parameters, "weight") for m in ("input_layernorm", "post_attention_layernorm")]
            self.slots += [(block._modules[owner]._modules, proj) for owner, proj in _PROJ]
        wrapped = [p.mods[i] for p in plans for i in p.wrapped]
        bases = [m.base if _is_lora(m) else m for p in plans for m in p.mods]
        self.slots += [(b._buffers, t) for b in bases for t in ("lut", "packed") if b._buffers.get(t) is not None]
        self.slots += [(b._parameters, "weight") for b in bases if type(b) is KernelLinear]
        for m in wrapped:
            self.slots += [(m._buffers if t in m._buffers else m._parameters, t) for t in ("lora_A", "lora_B", "lora_scale")]
        self.ids = [id(d[k]) for d, k in self.slots]
        # The blocks' own records of what they were built from: LUT and index tensors at their versions, act8 flags.
        self.tensors, self.versions = [t for p in plans for t, _ in p.luts], [v for p in plans for _, v in p.luts]
        self.flagged, self.flags = [m for p in plans for m, _ in p.flags], [a for p in plans for _, a in p.flags]
        self.routing = wrapped[0].routing if wrapped else None
        self.routes = False

    def fresh(self) -> bool:
        return (
            [id(d[k]) for d, k in self.slots] == self.ids
            and [t._version for t in self.tensors] == self.versions
            and [b.act8 for b in self.flagged] == self.flags
        )

    def adapter_slots(self) -> torch.Tensor | None:
        """This step's adapter slot per row ((B,) or (1,) for all rows), or None when no adapter is routed."""
        r = self.routing
        if r is None or (r.index is None and r.slot is None):
            return None
        return r.index if r.index is not None else torch.tensor([r.slot])


_FAST = {
    nn.Linear: KernelLinear, TiedLinear: KernelTiedLinear, RMSNorm: KernelRMSNorm, MLP: KernelMLP, Block: KernelBlock,
    Transformer: KernelTransformer,
}  # fmt: skip
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
