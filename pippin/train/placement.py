"""Where an adapter trains: a frozen base on any torch device (`--device cuda`), with bf16 autocast (`--bf16`).

`on_device(model, device)` swaps every compressed module of a frozen base (LUT linears, the LUT or int8 embedding and
its tied head) for a dense copy of its dequantized weight, moves the model to the device, and on exit moves it back
and puts the compressed modules back where they were. A frozen base's reference path is `F.linear(x, dequantize())`
at every step; the dense copy computes exactly that once, and runs where pippin's CPU kernels cannot (a GPU). LoRA
parameters stay fp32 (the master weights); `autocast(device, bf16)` runs the matmuls in bf16 when asked, as
torch.amp does. Nothing here changes what is saved: the adapter's base fingerprint is taken on the compressed base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pippin.errors import PippinError
from pippin.model.transformer import TiedLinear
from pippin.quant.linear import Int8Embedding, Int8TiedHead, PalettizedEmbedding, PalettizedLinear, PalettizedTiedHead


def resolve_device(name: str) -> torch.device:
    """The torch device `name` names, checked to exist here (a PippinError that says what to use otherwise)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PippinError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise PippinError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); train with --device cpu.")
        if dev.index is not None and dev.index >= n:
            raise PippinError(f"--device {name}: there are only {n} CUDA devices (cuda:0 to cuda:{n - 1}).")
    elif dev.type != "cpu":
        raise PippinError(f"--device {name}: only cpu and cuda are supported for adapter training.")
    return dev


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when asked (matmuls in bf16, reductions and the losses in fp32), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _frozen(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().float().clone(), requires_grad=False)


def densify_(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Swap each compressed module for a dense, frozen copy of its weights; returns [(name, original)] to restore."""
    swapped: list[tuple[str, nn.Module]] = []
    dense_emb: dict[int, nn.Embedding] = {}
    mods = list(model.named_modules())
    for name, m in mods:  # embeddings first: their heads read them
        if isinstance(m, PalettizedEmbedding | Int8Embedding):
            w = m.dequantize()
            e = nn.Embedding(*w.shape)
            e.weight = _frozen(w)
            dense_emb[id(m)] = e
            swapped.append((name, m))
            _set(model, name, e)
    for name, m in mods:
        if isinstance(m, PalettizedTiedHead | Int8TiedHead):
            emb = dense_emb.get(id(m._embedding))
            if emb is None:
                raise PippinError(f"{name} reads an embedding that is not part of the model; cannot train it on a device.")
            swapped.append((name, m))
            _set(model, name, TiedLinear(emb))
        elif type(m) is PalettizedLinear:
            lin = nn.Linear(m.in_features, m.out_features, bias=False)
            lin.weight = _frozen(m.dequantize())
            swapped.append((name, m))
            _set(model, name, lin)
    return swapped


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model with dense frozen weights on `device` for the duration; compressed and on the CPU again afterwards."""
    swapped = densify_(model)
    try:
        yield model.to(device)
    finally:
        model.to("cpu")
        for name, m in reversed(swapped):
            _set(model, name, m)
