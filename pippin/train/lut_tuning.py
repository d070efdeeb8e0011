"""Tune a compressed model's LUTs and row scales end to end: distillation from full precision, the indices fixed.

GPTQ and k-means fit each layer to its own inputs; the errors of 210 layers then compound. `tune_luts` trains what a
palettized model stores besides its indices, every LUT entry and every row scale (0.26 % of the weights' count for
SmolLM2-135M), to match full precision's next-token distribution at every position of calibration windows. The
kernels, the stored format and the size do not change. This is AQLM's and EfficientQAT's end-to-end step (E2E-QP:
quantization parameters only) for 1-D LUTs. A tensor's Adam step is `lr` times its own RMS (row scales are about
0.05, LUT entries about 1), so one rate serves both. Trained fp32 masters are stored back in fp16, as compression stores
them. A killed run resumes from its checkpoint; batches are keyed by the step, so a resumed run sees the same data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pippin.errors import PippinError
from pippin.io import write_atomic
from pippin.quant.linear import PalettizedLinear
from pippin.quant.pack import unpack
from pippin.train.adapter import lr_at, set_act8
from pippin.train.checkpointing import resume, save_state
from pippin.train.losses import masked_kl


@dataclass(kw_only=True)
class LutTuneConfig:
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    """Peak Adam step, relative to each tensor's RMS."""
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    save_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise PippinError(f"LutTuneConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise PippinError(f"LutTuneConfig.lr must be > 0, got {self.lr}.")


@dataclass(kw_only=True)
class LutTuneResult:
    steps: int
    resumed_from: int
    losses: list[float]
    """KL(full precision || model) per step, on that step's batch."""
    seconds: float
    n_params: int
    """Trained values: LUT entries and row scales."""


def tuned_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every palettized module's LUTs and row scales, by state-dict name (what `tune_luts` trains)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PalettizedLinear):
            out[f"{name}.lut"] = m.lut
            if m.row_scale is not None:
                out[f"{name}.row_scale"] = m.row_scale
    return out


@contextlib.contextmanager
def trainable_luts(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """fp32 trainable masters in place of the fp16 LUT and row-scale buffers; on exit they are stored back in fp16.
    Meanwhile each layer keeps its indices unpacked (8 bytes a weight) instead of unpacking them on every step."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, PalettizedLinear)}
    params: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        m.index_cache = unpack(m.packed, m.bits, m.in_features)
        m.lut = m.lut.float().requires_grad_()
        params[f"{name}.lut"] = m.lut
        if m.row_scale is not None:
            m.row_scale = m.row_scale.float().requires_grad_()
            params[f"{name}.row_scale"] = m.row_scale
    try:
        yield params
    finally:
        for m in mods.values():
            m.index_cache = None
            m.lut = m.lut.detach().half()
            if m.row_scale is not None:
                m.row_scale = m.row_scale.detach().half()


def run_hash(config: LutTuneConfig, windows: torch.Tensor, model: nn.Module) -> str:
    """What a checkpoint must match to be resumed: the config (less the step count and pace), the data and the
    untuned LUTs, row scales and indices."""
    d = asdict(config)
    for k in ("steps", "save_every"):
        d.pop(k)
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    for name, t in sorted(model.state_dict().items()):
        if name.endswith((".lut", ".row_scale", ".packed")):
            h.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tune_luts(
    model: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: LutTuneConfig,
    *,
    checkpoint: str | Path,
    progress: bool = True,
) -> LutTuneResult:
    """Train `model`'s LUTs and row scales (in place) so its next-token distributions on `windows` ((n, T) token ids)
    match `teacher`'s: the mean KL(teacher || model) over every position. Checkpoints go to `checkpoint` (a folder);
    the same call after a kill resumes there."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise PippinError(f"LUT tuning needs (n, T >= 2) token windows, got shape {tuple(windows.shape)}.")
    if not any(isinstance(m, PalettizedLinear) for m in model.modules()):
        raise PippinError("The model has no palettized layer: there are no LUTs to tune.")
    rh = run_hash(config, windows, model)
    teacher.eval()
    act8 = set_act8(model, False)  # the rounding of activations has no useful gradient
    t0 = time.perf_counter()
    try:
        with trainable_luts(model) as params:
            n_params = sum(p.numel() for p in params.values())
            # One group per tensor: its step is lr times its own RMS (row scales and LUT entries differ 20x in size).
            groups = [{"params": [p], "rel": p.detach().pow(2).mean().sqrt().clamp_min(1e-8).item()} for p in params.values()]
            opt = torch.optim.Adam(groups, lr=config.lr)
            start, losses = 0, []
            if (meta := resume(checkpoint, run=rh, params=params, optimizer=opt, key="run_hash")) is not None:
                start, losses = int(meta["step"]), list(meta.get("losses", []))
            model.train()
            bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="tune LUTs", disable=not progress, unit="step")
            for step in bar:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, config) * g["rel"]
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                x = windows[torch.randint(len(windows), (config.batch_size,), generator=gen)]
                with torch.no_grad():
                    target = teacher(x)
                loss = masked_kl(model(x), target, torch.ones(x.shape, dtype=torch.bool))
                loss.backward()
                if not math.isfinite(loss.item()):
                    raise PippinError(f"LUT tuning diverged at step {step}; lower the learning rate. The last checkpoint is kept.")
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(kl=f"{losses[-1]:.4f}")
                done = step + 1
                if done % config.save_every == 0 or done == config.steps:
                    save_state(checkpoint, step=done, params=params, optimizer=opt, extra={"run_hash": rh, "losses": losses})
    finally:
        model.eval()
        set_act8(model, act8)
    return LutTuneResult(steps=config.steps, resumed_from=start, losses=losses, seconds=time.perf_counter() - t0, n_params=n_params)


def write_log(path: str | Path, result: LutTuneResult) -> None:
    write_atomic(Path(path), "".join(json.dumps({"step": i + 1, "kl": v}) + "\n" for i, v in enumerate(result.losses)).encode())
