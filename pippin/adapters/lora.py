"""LoRA: low-rank adapters that wrap any linear-like module (dense or palettized) from outside.

`apply_lora(model, config, n_slots=...)` swaps each target module (by the last part of its name: q, k,
v, o, gate, up, down by default) for a `LoRALinear` that keeps the base module untouched and adds
`scale * B A x`. Each wrapper sees `n_slots` adapters as fp16 views into one `LoraBank` per model (computed in
fp32; a swap is one copy for all modules), and one
`Routing` object shared by every wrapper of a model says which slot each batch row uses: one slot for
all rows (one matmul pair), or a per-row slot index (two batched matmuls over gathered A/B; LoRAX /
S-LoRA style), so a batch mixes adapters in one forward pass. Slot 0 is reserved as "no adapter" (zeros).
For training, `trainable=True` makes a single fp32 slot of `nn.Parameter`s.

The adapter is never merged into a low-bit base (that would round it away); `merge_lora_` exists for
dense bases only. Follows PEFT's LoRA (Hu et al. 2021) for initialisation and scaling (alpha / r).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pippin.errors import PippinError
from pippin.kernels import ops

FAST_MAX_ROWS = 16
"""Up to this many rows (decode) the fp16 slots run through pippin's lora_add_ kernel."""

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 16
    """r: the inner dimension of B A."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) B A x (or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (off by default, as AFM)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Last components of the module names to wrap."""
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise PippinError(f"LoRA rank must be >= 1, got {self.rank}.")
        if not self.target_modules:
            raise PippinError("LoRA needs at least one target module.")
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class Routing:
    """Which adapter slot each row uses; shared by every LoRALinear of one model, so setting it is O(1)."""

    slot: int | None = None
    """One slot for every row (None: no adapter)."""
    index: torch.Tensor | None = None
    """(B,) long: a slot per row (0 = none). Takes precedence over `slot`."""
    bank: LoraBank | None = None
    """The slots' storage (serving); None for a trainable single-slot model."""

    def set(self, slots: int | list[int] | torch.Tensor | None) -> None:
        """One slot for all rows, or one per row (collapsed to the single-slot path when all rows agree)."""
        if slots is None or isinstance(slots, int):
            self.slot, self.index = (slots or None), None
            return
        idx = torch.as_tensor(slots, dtype=torch.long)
        if bool((idx == idx[0]).all()):
            self.set(int(idx[0]))
        else:
            self.slot, self.index = None, idx


def in_out_features(base: nn.Module) -> tuple[int, int]:
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    raise PippinError(f"LoRA can only wrap linear-like modules (with in_features/out_features), not {type(base).__name__}.")


class LoRALinear(nn.Module):
    """y = base(x) + scale[s] * B[s] (A[s] x) for each row's slot s."""

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        n_slots: int,
        routing: Routing,
        trainable: bool = False,
        dropout: float = 0.0,
        views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_out_features(base)
        self.rank = rank
        object.__setattr__(self, "routing", routing)  # shared plain object, not a submodule
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if views is not None:  # slices of the model's LoraBank: a swap is one copy for all modules
            A, B, scale = views
            self.register_buffer("lora_A", A, persistent=False)
            self.register_buffer("lora_B", B, persistent=False)
            self.register_buffer("lora_scale", scale, persistent=False)
            return
        A = torch.zeros(n_slots, rank, self.in_features)
        B = torch.zeros(n_slots, self.out_features, rank)
        if trainable:
            nn.init.kaiming_uniform_(A[0], a=math.sqrt(5))  # PEFT's init: A random, B zero => starts at the base
            self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)
        else:
            self.register_buffer("lora_A", A.half())
            self.register_buffer("lora_B", B.half())
        self.register_buffer("lora_scale", torch.zeros(n_slots))

    @property
    def n_slots(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        r = self.routing
        if r.index is None and r.slot is None:
            return y
        if self._fast(x, y):
            idx = r.index if r.index is not None else torch.tensor([r.slot])
            ops().lora_add_(y, x, self.lora_A, self.lora_B, self.lora_scale, idx)
            return y
        if r.index is not None:
            idx = r.index
            x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (B, T, K)
            A = self.lora_A[idx].float()  # (B, r, K)
            Bm = self.lora_B[idx].float()  # (B, N, r)
            d = torch.bmm(torch.bmm(x3, A.transpose(1, 2)), Bm.transpose(1, 2)) * self.lora_scale[idx].view(-1, 1, 1)
            return y + d.view_as(y)
        s = r.slot
        h = F.linear(self.dropout(x), self.lora_A[s].float())
        return y + self.lora_scale[s] * F.linear(h, self.lora_B[s].float())

    def kernel_lora(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A, B, scale) slot banks for pippin.kernels' FusedDecoder (fp16 inference slots); None for trainable ones."""
        if self.lora_A.dtype != torch.float16 or self.lora_A.requires_grad:
            return None
        return self.lora_A, self.lora_B, self.lora_scale

    def _fast(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Inference on a few fp32 rows with fp16 slots: the kernel adds the update into y in place."""
        return (
            not torch.is_grad_enabled()
            and self.lora_A.dtype == torch.float16
            and x.dtype == torch.float32
            and y.is_contiguous()
            and x.numel() // x.shape[-1] <= FAST_MAX_ROWS
            and ops() is not None
        )

    def load_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Copy one adapter's (r', K) A and (N, r') B into a slot, zero-padding r' up to the slot rank."""
        with torch.no_grad():
            if A is None or B is None:
                self.lora_A[slot].zero_()
                self.lora_B[slot].zero_()
                self.lora_scale[slot] = 0.0
                return
            r = A.shape[0]
            if r < self.rank:  # zero padding contributes nothing; a full-rank copy overwrites everything
                self.lora_A[slot, r:].zero_()
                self.lora_B[slot, :, r:].zero_()
            self.lora_A[slot, :r].copy_(A)
            self.lora_B[slot, :, :r].copy_(B)
            self.lora_scale[slot] = scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, slots={self.n_slots}, in={self.in_features}, out={self.out_features}"


class LoraBank:
    """Every serving slot of every LoRALinear of a model in two tensors, so swapping an adapter into a slot is
    one contiguous copy (~10 MB for SmolLM2 at rank 16) instead of hundreds of small ones.

    weights: (n_slots, total) fp16; module j's A is weights[:, a_j : a_j + r*K].view(n_slots, r, K) and its B
    follows. scales: (n_modules, n_slots) fp32, so each module's per-slot scales are one contiguous row.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], *, rank: int, n_slots: int) -> None:
        self.rank, self.n_slots = rank, n_slots
        self.layout: dict[str, tuple[int, int, int, int]] = {}  # name -> (offset, K, N, module index)
        off = 0
        for j, (name, (K, N)) in enumerate(shapes.items()):
            self.layout[name] = (off, K, N, j)
            off += rank * (K + N)
        self.weights = torch.zeros(n_slots, off, dtype=torch.float16)
        self.scales = torch.zeros(len(shapes), n_slots)

    def views(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        off, K, N, j = self.layout[name]
        r, S = self.rank, self.n_slots
        A = self.weights[:, off : off + r * K].view(S, r, K)
        B = self.weights[:, off + r * K : off + r * (K + N)].view(S, N, r)
        return A, B, self.scales[j]

    def pack(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scales: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """An adapter in this bank's layout: (total,) fp16 with ranks zero-padded, and (n_modules,) scales."""
        flat = torch.zeros(self.weights.shape[1], dtype=torch.float16)
        sc = torch.zeros(len(self.layout))
        for name, (A, B) in weights.items():
            off, K, N, j = self.layout[name]
            r = A.shape[0]
            flat[off : off + self.rank * K].view(self.rank, K)[:r] = A
            flat[off + self.rank * K : off + self.rank * (K + N)].view(N, self.rank)[:, :r] = B
            sc[j] = scales[name]
        return flat, sc

    def load(self, slot: int, flat: torch.Tensor | None, scales: torch.Tensor | None) -> None:
        """Make `slot` hold a packed adapter (None: clear it)."""
        with torch.no_grad():
            if flat is None:
                self.weights[slot].zero_()
                self.scales[:, slot] = 0.0
            else:
                self.weights[slot].copy_(flat)
                self.scales[:, slot] = scales


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Wrapped modules by their (base) module name, e.g. 'layers.0.self_attn.q_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def routing_of(model: nn.Module) -> Routing:
    mods = lora_modules(model)
    if not mods:
        raise PippinError("The model has no LoRA modules; call apply_lora first.")
    return next(iter(mods.values())).routing


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_lora(model: nn.Module, config: LoraConfig, *, n_slots: int = 1, trainable: bool = False) -> Routing:
    """Wrap every target module in place; returns the shared Routing. Trainable: base frozen, slot 0 active."""
    if lora_modules(model):
        raise PippinError("The model already has LoRA modules.")
    targets = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in config.target_modules]
    if not targets:
        raise PippinError(f"No module of the model matches the LoRA targets {list(config.target_modules)}.")
    if trainable:
        n_slots = 1
        for p in model.parameters():
            p.requires_grad_(False)
    routing = Routing()
    if not trainable:
        routing.bank = LoraBank({n: in_out_features(b) for n, b in targets}, rank=config.rank, n_slots=n_slots)
    for name, base in targets:
        views = routing.bank.views(name) if routing.bank is not None else None
        m = LoRALinear(base, rank=config.rank, n_slots=n_slots, routing=routing, trainable=trainable, dropout=config.dropout, views=views)
        if trainable:
            m.lora_scale[0] = config.scaling
        _set_module(model, name, m)
    if trainable:
        routing.slot = 0  # the one trainable slot is a real adapter (serving reserves slot 0 for "none")
    return routing


def remove_lora_(model: nn.Module) -> None:
    """Unwrap every LoRALinear back to its base module (the adapters are dropped)."""
    for name, m in lora_modules(model).items():
        _set_module(model, name, m.base)


def merge_lora_(model: nn.Module, *, slot: int = 0) -> None:
    """Fold slot `slot` into dense bases (W += scale B A) and unwrap. Refused for compressed bases."""
    mods = lora_modules(model)
    lossy = [n for n, m in mods.items() if not isinstance(m.base, nn.Linear)]
    if lossy:
        raise PippinError(
            f"Refusing to merge into a compressed base ({type(mods[lossy[0]].base).__name__} at {lossy[0]}): the "
            "low-bit weights would round the adapter away. Keep it as an adapter, or merge into the full-precision model."
        )
    with torch.no_grad():
        for m in mods.values():
            delta = m.lora_scale[slot] * (m.lora_B[slot].float() @ m.lora_A[slot].float())
            m.base.weight += delta.to(m.base.weight.dtype)
    remove_lora_(model)


def base_fingerprint(model: nn.Module) -> str:
    """A short hash naming the base an adapter was trained on: module types, bit widths and every tensor's bytes
    (weights, packed indices, LUTs, norms), so an adapter matches only the exact base it was trained on; a
    reproducible compression gives the same hash twice (about 1 s for a 135M fp32 model)."""
    h = hashlib.sha256()
    unwrap = lambda n: n.replace(".base.", ".").removesuffix(".base")  # same names with or without LoRA
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear | nn.Dropout | nn.Identity) and not list(m.children()):
            h.update(f"{unwrap(name)}:{type(m).__name__}:{getattr(m, 'bits', '')};".encode())
    state = model.state_dict()
    for name in sorted(state, key=unwrap):
        if ".lora_" in name:
            continue
        t = state[name]
        h.update(f"{unwrap(name)}{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:16]
