"""Resumable training state, without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is `state-{step}.safetensors` (trainable parameters and the optimizer's tensors) plus
`state.json`, which names that file and holds the step, the optimizer's scalar settings, the loss history
and a hash of the run (config, data and base) that a resume must match. Both are written atomically,
tensors first, so the JSON always points at a complete file: a run killed at any moment resumes from its
last checkpoint and loses at most the steps since. Older tensor files are removed once the new JSON is in
place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from pippin.errors import PippinError
from pippin.io import write_atomic, write_json_atomic

STATE_JSON = "state.json"


def save_state(
    folder: str | Path, *, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> Path:
    folder = Path(folder)
    opt = optimizer.state_dict()
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    name = f"state-{step}.safetensors"
    write_atomic(folder / name, st_save(tensors))
    write_json_atomic(
        folder / STATE_JSON,
        {"step": step, "tensors": name, "param_groups": opt["param_groups"], "opt_scalars": scalars, **extra},
    )
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def load_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """(meta, params, optimizer state_dict) of the last checkpoint, or None when there is none."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        return None
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        name = str(meta["tensors"])
        if "/" in name or not name.startswith("state-") or not name.endswith(".safetensors"):
            raise ValueError(f"unexpected tensor file name {name!r}")
        tensors = load_file(folder / name)
    except Exception as e:  # a hand-edited or damaged checkpoint: say so instead of silently restarting
        raise PippinError(f"Cannot resume from {folder}: the checkpoint is damaged ({e}). Delete it to start over.") from None
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for pid, sc in meta.get("opt_scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    return meta, params, {"state": state, "param_groups": meta["param_groups"]}


def resume(
    folder: str | Path, *, run: Any, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, key: str = "run"
) -> dict[str, Any] | None:
    """Restore `params` and the optimizer in place from the last checkpoint in `folder`, saved with `extra={key: run,
    ...}`; its meta (step and extras), or None when there is none. A checkpoint of another run (another config, data
    or base: `run` differs) or with other tensors is refused."""
    state = load_state(folder)
    if state is None:
        return None
    meta, saved, opt_state = state
    if meta.get(key) != run:
        raise PippinError(f"{folder} belongs to a different run (config, data or base changed); use another output folder or delete it.")
    if set(saved) != set(params) or any(saved[k].shape != p.shape for k, p in params.items()):
        raise PippinError(f"{folder} does not hold this run's tensors; delete it to start over.")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    optimizer.load_state_dict(opt_state)
    return meta
