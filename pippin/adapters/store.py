"""AdapterStore: adapters on disk, an LRU of loaded adapters in memory under a byte budget, and the model's
adapter slots, so a request can name any adapter and the base model is never reloaded.

Three levels, as in LoRAX / S-LoRA: a registry of folders (`root/<name>/`, PEFT format), a memory cache of
validated fp16 adapters packed in the model's slot layout (least recently used evicted past `budget_bytes`),
and `n_slots - 1` slots in the model's LoraBank (slot 0 means "no adapter"). `route(names)` makes every
adapter a batch needs resident in a slot (a swap is one contiguous copy), then points the model's Routing
at them, so one forward pass serves rows with different adapters. Names are plain identifiers: they cannot
reach outside the root folder. Mismatched or corrupt adapters are refused with a clear error and the store
keeps working. The bookkeeping is thread-safe (a server may call it from several threads); the forward pass
that reads the slots must run on one thread, between `route` calls (the server's worker does).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pippin.adapters.lora import LoraConfig, base_fingerprint, lora_modules, routing_of
from pippin.adapters.peft_format import CONFIG_FILE, Adapter, check_compatible, load_adapter
from pippin.errors import PippinError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise PippinError(f"Invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    return name


@dataclass(kw_only=True)
class CachedAdapter:
    """An adapter as the memory cache keeps it: packed in the model bank's layout, ready to copy into a slot."""

    name: str
    config: LoraConfig
    meta: dict
    flat: torch.Tensor
    """(total,) fp16: every module's A and B, rank zero-padded to the slots' rank."""
    scales: torch.Tensor
    """(n_modules,) fp32: each module's alpha / r (0 where the adapter does not touch a module)."""

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


@dataclass(kw_only=True)
class StoreStats:
    hits: int = 0
    """get() answered from memory."""
    misses: int = 0
    """get() read the adapter from disk."""
    evictions: int = 0
    swaps: int = 0
    """Adapters copied into a model slot."""
    last_load_ms: float = 0.0
    last_swap_ms: float = 0.0


class AdapterStore:
    """Disk registry + memory LRU + model slots for the LoRA adapters of one base model."""

    def __init__(self, root: str | Path | None, *, model: nn.Module, budget_bytes: int = 256 << 20) -> None:
        self.root = Path(root) if root is not None else None
        self.model = model
        self.budget_bytes = budget_bytes
        self.modules = lora_modules(model)
        if not self.modules:
            raise PippinError("The model has no LoRA slots; wrap it with apply_lora(model, config, n_slots=...) first.")
        self.routing = routing_of(model)
        self.n_slots = next(iter(self.modules.values())).n_slots
        self.fingerprint = base_fingerprint(model)
        self.stats = StoreStats()
        self._paths: dict[str, Path] = {}
        self.bank = self.routing.bank
        if self.bank is None:
            raise PippinError(
                "The model's LoRA modules are trainable (a single fp32 slot); serve a model made with apply_lora(..., n_slots=N)."
            )
        self._memory: OrderedDict[str, CachedAdapter] = OrderedDict()
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._lock = threading.RLock()

    # --- registry -------------------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> None:
        """Register an adapter folder under a name (outside the root, e.g. a PEFT checkpoint)."""
        check_name(name)
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise PippinError(f"{path} is not an adapter folder (no {CONFIG_FILE}).")
        with self._lock:
            self._paths[name] = path
            self._drop(name)  # a re-registered name must not serve the old weights

    def remove(self, name: str) -> bool:
        """Forget a registered name (and its memory and slot); folders under root stay requestable."""
        with self._lock:
            self._drop(name)
            return self._paths.pop(name, None) is not None

    def names(self) -> list[str]:
        """Every adapter that can be requested: registered ones plus the folders under root."""
        with self._lock:
            found = set(self._paths)
        if self.root is not None and self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file() and NAME.match(p.name)}
        return sorted(found)

    def path_of(self, name: str) -> Path:
        check_name(name)
        if name in self._paths:
            return self._paths[name]
        if self.root is not None and (self.root / name / CONFIG_FILE).is_file():
            return self.root / name
        known = ", ".join(self.names()) or "none"
        raise PippinError(f"Unknown adapter {name!r} (known: {known}).")

    # --- memory -----------------------------------------------------------------------------------------

    def get(self, name: str) -> CachedAdapter:
        """The validated adapter, from memory or else from disk (then cached, evicting LRU past the budget)."""
        with self._lock:
            if name in self._memory:
                self._memory.move_to_end(name)
                self.stats.hits += 1
                return self._memory[name]
            path = self.path_of(name)
        # Disk read, validation and packing happen outside the lock, so a cold load never stalls the decode loop
        # (which routes under the lock on every step).
        t0 = time.perf_counter()
        adapter = load_adapter(path, name=name)
        check_compatible(adapter, self.model, fingerprint=self.fingerprint)
        packed = self.bank.pack(adapter.weights, adapter.scales)
        with self._lock:
            if name in self._memory:  # another thread loaded it meanwhile
                self._memory.move_to_end(name)
                self.stats.hits += 1
                return self._memory[name]
            cached = self._remember(adapter, packed)
            self.stats.misses += 1
            self.stats.last_load_ms = (time.perf_counter() - t0) * 1000
            return cached

    def _remember(self, adapter: Adapter, packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> CachedAdapter:
        if packed is None:
            check_compatible(adapter, self.model, fingerprint=self.fingerprint)
        flat, scales = packed if packed is not None else self.bank.pack(adapter.weights, adapter.scales)
        cached = CachedAdapter(name=adapter.name, config=adapter.config, meta=adapter.meta, flat=flat, scales=scales)
        if cached.nbytes > self.budget_bytes:
            raise PippinError(
                f"Adapter {adapter.name!r} needs {cached.nbytes / 2**20:.1f} MiB, "
                f"over the cache budget of {self.budget_bytes / 2**20:.1f} MiB."
            )
        self._memory[adapter.name] = cached
        while self.memory_bytes > self.budget_bytes:
            self._memory.popitem(last=False)
            self.stats.evictions += 1
        return cached

    def put(self, adapter: Adapter) -> None:
        """Keep an in-memory adapter (e.g. one just trained) under its name, after validation."""
        check_name(adapter.name)
        with self._lock:
            self._drop(adapter.name)
            self._remember(adapter)

    def unload(self, name: str) -> bool:
        """Forget an adapter from memory and its slot (the files stay). Returns whether it was loaded."""
        with self._lock:
            return self._drop(name)

    def _drop(self, name: str) -> bool:
        was = self._memory.pop(name, None) is not None
        slot = self._slots.pop(name, None)
        if slot is not None:
            self.bank.load(slot, None, None)
        return was or slot is not None

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._memory)

    @property
    def memory_bytes(self) -> int:
        """Bytes the cached adapters take, in the bank's (rank-padded) layout."""
        with self._lock:
            return sum(a.nbytes for a in self._memory.values())

    # --- slots ------------------------------------------------------------------------------------------

    def slot_for(self, name: str, *, keep: set[str] = frozenset()) -> int:
        """Make `name` resident in a model slot (swapping out the least recently used one not in `keep`)."""
        with self._lock:
            if name in self._slots:
                self._slots.move_to_end(name)
                return self._slots[name]
            cached = self.get(name)
            used = set(self._slots.values())
            free = [s for s in range(1, self.n_slots) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next((n for n in self._slots if n not in keep), None)
                if victim is None:
                    raise PippinError(
                        f"All {self.n_slots - 1} adapter slots are in use by this batch; raise the slot count or split the batch."
                    )
                slot = self._slots.pop(victim)
            t0 = time.perf_counter()
            self.bank.load(slot, cached.flat, cached.scales)  # one copy into every module's slot at once
            self.stats.swaps += 1
            self.stats.last_swap_ms = (time.perf_counter() - t0) * 1000
            self._slots[name] = slot
            return slot

    def route(self, names: Sequence[str | None], *, keep: Sequence[str] = ()) -> list[int]:
        """Point the model at one adapter per batch row (None = base only); returns the slots used. Adapters not in memory
        are read from disk first, outside the lock (`/v1/models` and `/metrics` take it from the event loop)."""
        wanted = {n for n in names if n is not None} | set(keep)
        if len(wanted) <= self.n_slots - 1:
            for n in sorted({n for n in names if n is not None}):
                if n not in self._slots and n not in self._memory:
                    self.get(n)
        with self._lock:
            if len(wanted) > self.n_slots - 1:
                raise PippinError(f"A batch may use at most {self.n_slots - 1} different adapters, got {len(wanted)}.")
            slots = [0 if n is None else self.slot_for(n, keep=wanted) for n in names]
            self.routing.set(slots if len(slots) > 1 else (slots[0] if slots else None))
            return slots
