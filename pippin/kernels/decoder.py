"""FusedDecoder: a model's decoder blocks for a few tokens per row in one kernel call, built explicitly from the model.

`FusedDecoder.from_model(model)` reads the model's modules once and hands their per-layer arguments (norms, the 7
projections of each block, LUTs, bits, the LoRA slot banks) to C++ (`DecodePlan`); the engine then calls the
decoder where it would call the model, with the same signature. A step costs one call from Python instead of
~40 eager ops per layer; with one token per row it runs all layers in one parallel region (see csrc/step.cpp).
The model stays plain and is the reference path: the decoder runs it for anything the kernels do not cover
(more than `GEMV_MAX_ROWS` tokens, autograd, no cache, an adapter the plan cannot route) and refuses at build time
a model it cannot run (QK-norm, a block or projection it does not know, mixed group sizes): `fused` says which.

Projections are dense `nn.Linear` (fp32 / fp16 / bf16), or palettized modules that offer `kernel_args()` (pippin.quant's
PalettizedLinear: this package sits below quant), which may carry an online input rotation (the plan rotates that
projection's input into a buffer of its own; a LoRA on it still reads the unrotated input); a LoRA wrapper offers
`kernel_lora()` (pippin.adapters' LoRALinear: its fp16 slot banks, or None for trainable adapters) and `routing` (which
slot each row uses, read per call). Build a new decoder when the model's modules, LUTs or act8 switches change; loading an adapter into an
existing slot needs none (the plan reads the banks in place).
"""

from __future__ import annotations

import torch
from torch import nn

from pippin.kernels import ops
from pippin.model.transformer import Block, RMSNorm, TiedLinear, Transformer

GEMV_MAX_ROWS = 16
"""Above this many tokens a step is compute-bound and PyTorch's GEMMs (the model itself) win."""

_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip


def _projection(m: nn.Module) -> tuple | None:
    """(weight or packed indices, LUT, output scales, bits, group, input rotation (signs, block) or None) of a
    projection; None if the kernels cannot run it."""
    if type(m) is nn.Linear:
        return (m.weight, None, None, 0, 0, None) if m.bias is None else None
    kernel_args = getattr(type(m), "kernel_args", None)
    return kernel_args(m) if kernel_args is not None else None


def _split_lora(m: nn.Module) -> tuple[nn.Module, tuple | None, bool]:
    """(base, (A, B, scale) slot banks or None, is a LoRA wrapper) of a projection module."""
    kernel_lora = getattr(type(m), "kernel_lora", None)
    if kernel_lora is None:
        return m, None, False
    return m.base, kernel_lora(m), True


def _layer_args(block: nn.Module) -> tuple[list, list] | None:
    """One block's DecodePlan arguments and its 7 projections' LoRA banks; None if the kernels cannot run it."""
    if type(block) is not Block:
        return None
    attn, mlp = block.self_attn, block.mlp
    if attn.q_norm is not None or type(block.input_layernorm) is not RMSNorm or type(block.post_attention_layernorm) is not RMSNorm:
        return None
    mods = [(attn if owner == "self_attn" else mlp)._modules[name] for owner, name in _PROJ]
    split = [_split_lora(m) for m in mods]
    projs = [_projection(base) for base, _, _ in split]
    if any(p is None for p in projs):
        return None
    groups = {p[4] for p in projs if p[3]}
    if len(groups) > 1:
        return None
    args = [
        block.input_layernorm.weight, block.post_attention_layernorm.weight,
        [p[0] for p in projs], [p[1] for p in projs], [p[2] for p in projs], [p[3] for p in projs], groups.pop() if groups else 1,
        [p[5] and p[5][0] for p in projs], [p[5] and p[5][1] for p in projs],
    ]  # fmt: skip
    return args, [(bank, wrapped) for _, bank, wrapped in split]


class FusedDecoder:
    """The model's forward for few-token inference steps over an engine's KV cache, on the CPU kernels."""

    def __init__(self, model: Transformer, plan: object = None, *, routing: object = None, routes: bool = False) -> None:
        self.model = model
        self.plan = plan
        """torch.classes.pippin.DecodePlan, or None: every call runs the model itself."""
        self.routing = routing
        """The model's adapter routing (which slot each row uses), or None without LoRA wrappers."""
        self.routes = routes
        """The plan can run the model's adapters (fp16 slot banks on every wrapper)."""
        head = model.lm_head
        dense = type(head) in (TiedLinear, nn.Linear) and getattr(head, "bias", None) is None
        self._dense_head = dense and head.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
        """The head is a plain matrix (fp32 / fp16 / bf16): the kernels' matvec; else the head module runs."""

    @classmethod
    def from_model(cls, model: Transformer) -> FusedDecoder:
        """Read the model's blocks into a plan (a decoder that always runs the model when the kernels cannot)."""
        layers = list(model.layers)
        if ops() is None or not layers or type(model.norm) is not RMSNorm:
            return cls(model)
        per_layer = [_layer_args(b) for b in layers]
        if any(a is None for a in per_layer):
            return cls(model)
        attn = layers[0].self_attn
        banks = [bank for _, lo in per_layer for bank in lo]
        plan = torch.classes.pippin.DecodePlan(
            [a[0] for a, _ in per_layer], [a[1] for a, _ in per_layer],
            [w for a, _ in per_layer for w in a[2]], [t for a, _ in per_layer for t in a[3]], [t for a, _ in per_layer for t in a[4]],
            [b for a, _ in per_layer for b in a[5]], [a[6] for a, _ in per_layer],
            attn.n_heads, attn.n_kv_heads, layers[0].input_layernorm.eps,
            [b and b[0] for b, _ in banks], [b and b[1] for b, _ in banks], [b and b[2] for b, _ in banks],
            [s for a, _ in per_layer for s in a[7]], [r for a, _ in per_layer for r in a[8]],
        )  # fmt: skip
        routing = next((m.routing for m in model.modules() if _split_lora(m)[2]), None)
        routes = plan.routes_adapters() and all(bank is not None for bank, is_lora in banks if is_lora)
        return cls(model, plan, routing=routing, routes=routes)

    @property
    def fused(self) -> bool:
        """Whether few-token steps run on the kernels (False: the model cannot be planned, or no kernels here)."""
        return self.plan is not None

    def adapter_slots(self) -> torch.Tensor | None:
        """This step's adapter slot per row ((B,) or (1,) for all rows), or None when no adapter is routed."""
        r = self.routing
        if r is None or (r.index is None and r.slot is None):
            return None
        return r.index if r.index is not None else torch.tensor([r.slot])

    def __call__(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: object = None,
        mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` (B, T), as `Transformer.forward`; cache is the engine's KVCache (`begin` already called)."""
        h = self.features(tokens, positions=positions, cache=cache)
        if h is None:
            return self.model(tokens, positions=positions, cache=cache, mask=mask, logits_at=logits_at)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0]), logits_at]
        return self.head(h)

    def features(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None, cache: object = None) -> torch.Tensor | None:
        """Hidden states (B, T, dim) after the last block from the plan, or None when this step is the model's to run."""
        if self.plan is None or positions is None or cache is None or tokens.numel() > GEMV_MAX_ROWS or torch.is_grad_enabled():
            return None
        slots = cache.all_slots()
        if slots is None:
            return None
        idx = self.adapter_slots()
        if idx is not None and (not self.routes or idx.numel() not in (1, tokens.shape[0])):
            return None
        h = self.model.embed_tokens(tokens)
        if h.dtype != torch.float32:
            return None
        return self.plan.forward(h, self.model.rope_cos[positions], self.model.rope_sin[positions], *slots, idx)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm plus output projection of a few rows (`Transformer.head` on the kernels)."""
        norm = self.model.norm
        h = ops().rms_norm(h, norm.weight, norm.eps)
        if self._dense_head:
            return ops().gemv(h, self.model.lm_head.weight)
        return self.model.lm_head(h)
