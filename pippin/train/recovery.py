"""A closed-form start for accuracy-recovery adapters: each layer's compression error, low-rank, activation-weighted.

A recovery adapter learns to undo what compression did to the base. For one linear layer the best rank-r
correction in the least-squares sense on its inputs x is known in closed form: with W the full-precision weight,
W_hat the compressed one and H = E[x x^T] the second moment of the compressed model's inputs to that layer,

    minimise E || (W - W_hat - L) x ||^2  over rank-r L   =>   L = SVD_r((W - W_hat) H^1/2) H^-1/2

(as in LQER / QERA / CLoQ). This module computes it for every LoRA target from a few calibration sequences,
so distillation starts from an adapter that already cancels much of each layer's error instead of from zero.
H is accumulated in float64, shrunk towards its diagonal (a few thousand tokens estimate it poorly, see
`residual_factors`) and damped by a small multiple of its mean diagonal, so that directions the calibration
text never excites do not blow up through H^-1/2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from pippin.adapters.lora import LoraConfig
from pippin.errors import PippinError


@torch.no_grad()
def input_second_moments(
    model: nn.Module, sequences: Sequence[torch.Tensor], names: list[str], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """H = E[x x^T] (float64, K x K) of the inputs of each named module over calibration token sequences (each (T,)).

    Modules that read the same tensor (q, k and v; gate and up) get one shared matrix, computed once: a first
    forward only looks at which modules read which tensor."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise PippinError(f"The model has no module named {missing[0]!r}.")
    read: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    leaders: set[str] = set()

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def fn(mod, inp, out) -> None:  # noqa: ANN001
            if not leaders:  # discovery pass: hold the tensors, so that no two can share an id (or a freed buffer)
                read[name] = inp[0]
            elif name in leaders:
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x

        return fn

    was_training = model.training
    model.eval()
    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model(sequences[0][:8].unsqueeze(0))
        leader_of = {}
        first_reader: dict[int, str] = {}
        for n in names:
            leader_of[n] = first_reader.setdefault(id(read[n]), n)
        leaders.update(leader_of.values())
        read.clear()
        for seq in tqdm(sequences, desc="input moments", disable=not progress):
            model(seq.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for h in sums.values():
        h /= sum(seq.numel() for seq in sequences)
    return {n: sums[leader_of[n]] for n in names}  # followers share their leader's tensor


@torch.no_grad()
def residual_factors(
    teacher: nn.Module,
    student: nn.Module,
    sequences: Sequence[torch.Tensor],
    config: LoraConfig,
    *,
    shrinkage: float = 1.0,
    damping: float = 1e-2,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{target module name: (A (r, K), B (N, r))} such that scaling * B @ A is the best rank-r correction of the
    student's weight towards the teacher's on the student's own calibration inputs (see the module docstring).

    H is shrunk towards its diagonal, (1 - shrinkage) H + shrinkage diag(H), plus `damping` times its mean diagonal.
    A few thousand calibration tokens estimate a 1536 x 1536 H poorly, so the default (shrinkage 1) weights by the
    diagonal alone, as activation-aware quantizers do; shrinkage < 1 brings in the correlations. On SmolLM2-135M
    at 3.5 bpw the default start closes 43 % of the held-out perplexity gap before any training step.

    teacher and student must have the same module names (the student is the compressed copy); every student
    target exposes `.weight` (dense) or `.dequantize()` (palettized)."""
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    names = [n for n in s_mods if n.rpartition(".")[2] in config.target_modules]
    if not names:
        raise PippinError(f"No module of the model matches the LoRA targets {list(config.target_modules)}.")
    absent = [n for n in names if n not in t_mods]
    if absent:
        raise PippinError(f"The teacher has no module {absent[0]!r}: it must be the same architecture as the model.")
    if not sequences:
        raise PippinError("The residual initialisation needs at least one calibration sequence.")
    moments = input_second_moments(student, sequences, names, progress=progress)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    root_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    r = config.rank
    for name in tqdm(names, desc="residual SVD", disable=not progress):
        s_mod = s_mods[name]
        w_hat = s_mod.dequantize() if hasattr(s_mod, "dequantize") else s_mod.weight
        w = t_mods[name].weight
        if w.shape != w_hat.shape:
            raise PippinError(f"{name}: teacher weight {tuple(w.shape)} does not match the model's {tuple(w_hat.shape)}.")
        H = moments[name]
        key = id(H)
        if key not in root_cache:  # H^1/2 and H^-1/2 from one eigendecomposition, shared by q/k/v and gate/up
            root_cache[key] = _roots(regularised(H, shrinkage=shrinkage, damping=damping))
        root, inv_root = root_cache[key]
        U, S, Vh = torch.linalg.svd((w.double() - w_hat.double()) @ root, full_matrices=False)
        k = min(r, S.numel())
        A = Vh[:k] @ inv_root
        B = U[:, :k] * (S[:k] / config.scaling)
        # Balance each rank-one term (same B A): H^-1/2 makes A large where inputs are small, and adapters are
        # stored in fp16, where an unbalanced pair would lose B to underflow.
        c = (B.norm(dim=0) / A.norm(dim=1).clamp_min(1e-30)).sqrt()
        out[name] = ((A * c[:, None]).float(), (B / c[None, :]).float())
    return out


def regularised(H: torch.Tensor, *, shrinkage: float, damping: float) -> torch.Tensor:
    """(1 - shrinkage) H + shrinkage diag(H) + damping * mean(diag(H)) I: the matrix residual_factors weights by."""
    d = H.diagonal()
    return (1 - shrinkage) * H + torch.diag(shrinkage * d + damping * d.mean())


def _roots(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H^1/2 and H^-1/2 of a symmetric positive definite H (diagonal ones without an eigendecomposition)."""
    if torch.count_nonzero(H - torch.diag(H.diagonal())) == 0:
        d = H.diagonal().clamp_min(1e-12)
        return torch.diag(d.sqrt()), torch.diag(d.rsqrt())
    lam, V = torch.linalg.eigh(H)
    lam = lam.clamp_min(1e-12)
    return (V * lam.sqrt()) @ V.T, (V * lam.rsqrt()) @ V.T
