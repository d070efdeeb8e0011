"""Distributed checkpoints of a pretraining run: sharded, resharding on load, asynchronous, with a commit marker.

Each rank writes its own shards of the model and optimizer state with `torch.distributed.checkpoint` (DCP) through
its Hugging Face storage writer: safetensors files whose headers carry each shard's offsets as JSON, so there is no
pickled `.metadata` file and nothing is unpickled on load. The reader rebuilds the global tensors from those offsets,
which is what lets a run saved on one mesh (FSDP x2) resume on another (TP x2, one process). Only tensors are saved;
the optimizer's hyperparameters come back from the run config. A folder `step-NNNNNNN` is complete when its marker
`complete.json` (step, config hash, mesh, data position) exists; rank 0 writes it last, after every rank's write has
finished, and resume takes the newest complete folder. The final model is exported in pippin's own format.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pippin.errors import PippinError
from pippin.io import write_json_atomic

MARKER = "complete.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def latest_complete(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint folder whose marker exists and parses, with the marker; None if there is none."""
    if not root.is_dir():
        return None
    for folder in sorted(root.glob("step-*"), reverse=True):
        try:
            marker = json.loads((folder / MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # unfinished (killed mid-save): skipped, overwritten later
        if isinstance(marker, dict) and isinstance(marker.get("step"), int):
            return folder, marker
    return None


def _train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flat {name: tensor} of model weights and optimizer tensors (DTensors stay sharded: each rank saves its part)."""
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {f"model.{k}": v for k, v in get_model_state_dict(model, options=opts).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    state.update({f"optim.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)})
    return state


class Checkpointer:
    """Saves every interval (asynchronously where DCP can) and commits a save once all ranks have written it."""

    def __init__(self, root: Path, *, use_async: bool, keep: int) -> None:
        self.root, self.use_async, self.keep = root, use_async, keep
        self._pending: tuple[Future | None, Path, dict[str, Any]] | None = None
        # The background write runs collectives of its own: on the default group they would interleave with the
        # training step's and mismatch, so async saves get a gloo group of their own (torchtitan does the same).
        self.group = dist.new_group(backend="gloo") if use_async and dist.is_initialized() else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, marker: dict[str, Any]) -> None:
        self.wait()  # one save in flight at a time
        folder = step_dir(self.root, marker["step"])
        if _rank() == 0 and folder.exists():
            shutil.rmtree(folder)  # a leftover from a killed save of the same step
        _barrier()
        writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
        state = _train_state(model, optimizer)
        if self.use_async:
            self._pending = (dcp.async_save(state, storage_writer=writer, process_group=self.group), folder, marker)
        else:
            dcp.save(state, storage_writer=writer)
            self._pending = (None, folder, marker)
            self.poll(block=True)

    def poll(self, *, block: bool = False) -> bool:
        """Commit the pending save if every rank has finished writing it; True when nothing is pending any more."""
        if self._pending is None:
            return True
        fut, folder, marker = self._pending
        if block and fut is not None:
            fut.result()
        done = torch.tensor([1 if fut is None or fut.done() else 0])
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)  # every rank's shard must be on disk before the marker
        if not done.item():
            return False
        if fut is not None:
            fut.result()  # re-raise a failed write
        if _rank() == 0:
            write_json_atomic(folder / MARKER, marker)
            self._prune()
        self._pending = None
        return True

    def wait(self) -> None:
        self.poll(block=True)

    def _prune(self) -> None:
        complete = [f for f in sorted(self.root.glob("step-*")) if (f / MARKER).is_file()]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint into a model and optimizer on any mesh (DCP reshards to this run's placements)."""
    state = _train_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    except Exception as e:  # DCP raises several types for a missing or mismatched tensor
        raise PippinError(f"{folder} does not match this run's model and optimizer ({type(e).__name__}: {e})") from e
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    set_model_state_dict(model, {k[6:]: v for k, v in state.items() if k.startswith("model.")}, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    optim.update({k[6:]: v for k, v in state.items() if k.startswith("optim.")})
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 model state on rank 0's CPU (collective: every rank must call it); {} on other ranks."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
