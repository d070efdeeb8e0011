"""`pippin pretrain`: pretrain (or continue pretraining) a model from token shards, in one process or under torchrun.

  pippin pretrain --config run.json                        # one process (the config's mesh must be 1 process)
  pippin pretrain --config run.json --nproc-per-node 4     # prints the torchrun line for 4 processes on this node
  pippin pretrain --plot runs/pt                           # loss / grad norm / LR of a run as runs/pt/metrics.png

The config is a PretrainConfig as JSON (docs/pretraining.md has an example): mesh, model preset or init_from,
shards, optimizer and schedule, precision, checkpoint interval, optional teacher (in process, or on `teacher_ranks`
processes of its own, which the torchrun line counts). The same command resumes a killed run from its last complete
checkpoint; the trained model is OUT/model, a pippin checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a PretrainConfig as JSON")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node: above 1, print the torchrun line")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for a single process (default: all cores)")
    p.add_argument("--plot", metavar="RUN", help="draw RUN/metrics.jsonl as RUN/metrics.png and exit")


def run(args: argparse.Namespace) -> int:
    from pippin.errors import PippinError

    if args.plot:
        from pathlib import Path

        from pippin.train.pretrain_log import plot_metrics

        print(plot_metrics(Path(args.plot)))
        return 0
    if not args.config:
        raise PippinError("give --config C.json (a PretrainConfig; see docs/pretraining.md) or --plot RUN")
    from pippin.train.pretrain import PretrainConfig, run_pretrain

    config = PretrainConfig.from_json(args.config)  # validated here, before any process is started
    needed = config.mesh.world_size + config.teacher_ranks  # students (the mesh) and the teacher's own ranks
    if args.nproc_per_node > 1 or needed > 1:
        n = max(args.nproc_per_node, needed)
        line = f"torchrun --nproc-per-node {n} -m pippin.train.pretrain --config {shlex.quote(args.config)}"
        teachers = f" + {config.teacher_ranks} teacher ranks" if config.teacher_ranks else ""
        print(f"mesh {config.mesh.describe()} needs {config.mesh.world_size} processes{teachers}; run:\n  {line}", file=sys.stderr)
        print(line)
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = run_pretrain(config)
    if res.losses:
        print(f"pretrain: steps {res.start_step}..{res.steps}, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
              f"{res.tokens_per_s:.0f} tokens/s", file=sys.stderr)  # fmt: skip
    else:
        print(f"pretrain: already at step {res.steps}", file=sys.stderr)
    print(f"model: {res.model_path}")
    return 0
