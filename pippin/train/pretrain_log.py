"""The pretraining metrics log (JSONL, one row per logged step) and its plot; data order for the trainer.

`MetricsLog` appends rows on rank 0; on resume it drops rows past the resumed step, so a killed run's log has each
step once. `plot_metrics(run)` draws loss, gradient norm and learning rate against the step into RUN/metrics.png.
`GlobalBatches` is the loader over token shards: a seeded permutation of windows per epoch, step s takes samples
s*B .. (s+1)*B-1 of that order and each data-parallel rank its contiguous slice, so the position in the data is the
step itself (stored in every checkpoint marker) and any mesh with the same global batch sees the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pippin.data.shards import TokenShards
from pippin.errors import PippinError
from pippin.io import jsonl_rows, write_atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run: Path, *, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = run / METRICS_FILE, enabled
        if enabled and self.path.is_file():
            kept = [row for _, row in jsonl_rows(self.path) if row.get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise PippinError(f"{path} does not exist: give a run folder written by `pippin pretrain`")
    return [row for _, row in jsonl_rows(path)]


def plot_metrics(run: Path) -> Path:
    """Loss, gradient norm and learning rate against the step, as RUN/metrics.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for ax, key in zip(axes, ("loss", "grad_norm", "lr")):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{Path(run).name}: {len(rows)} steps")
    out = Path(run) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class GlobalBatches:
    """Deterministic global batches of (seq_len + 1)-token windows; `local(step)` is this rank's (B/dp, T+1) slice."""

    def __init__(self, shards: TokenShards, *, seq_len: int, global_batch: int, seed: int, dp_rank: int, dp_size: int):
        self.shards, self.seq_len, self.global_batch, self.seed = shards, seq_len, global_batch, seed
        self.n = shards.n_windows(seq_len)
        if self.n < 1:
            raise PippinError(f"{shards.folder} holds no window of {seq_len + 1} tokens; lower seq_len or add data")
        self.rows = range(dp_rank * global_batch // dp_size, (dp_rank + 1) * global_batch // dp_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def _sample(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][j])

    def local(self, step: int) -> torch.Tensor:
        first = step * self.global_batch
        return torch.from_numpy(np.stack([self.shards.window(self._sample(first + r), self.seq_len) for r in self.rows]))
