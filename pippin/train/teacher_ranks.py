"""The distillation teacher on ranks of its own: `torchrun --nproc-per-node S+T` runs S student ranks and T teacher ranks.

AFM's target, 0.9 onehot(teacher top-1) + 0.1 onehot(label), needs only the teacher's top-1 token per position, so a
teacher rank sends int64 ids (B_local, T) per step instead of logits (V times less traffic). Each teacher rank reads
the same global batches as the students it serves (the trainer's `GlobalBatches`, so the rows match exactly), runs the
whole teacher on them and sends the ids to every student rank of that data-parallel slice (its context and tensor
ranks). Students keep a process group of their own (the default group, so the student mesh, checkpoints and
collectives never see a teacher rank); ids travel on a separate gloo group over all ranks, on CPU tensors even when
training on GPUs (a few hundred KB a step). The teacher is stateless: it follows the step counter the students resume at.
Not here: a teacher sharded over several ranks (each teacher rank holds the whole teacher).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pippin.data.shards import read_shards
from pippin.errors import PippinError
from pippin.model.checkpoint import load_model
from pippin.train.parallelize import MeshConfig
from pippin.train.pretrain_log import GlobalBatches

TAG = 19  # the point-to-point tag of the ids (any constant: one stream per sender/receiver pair, in step order)
AHEAD = 2  # steps a teacher rank may run ahead of its students (sends not yet received)


@torch.no_grad()
def teacher_top1(teacher: torch.nn.Module, tokens: torch.Tensor, autocast: Any = None) -> torch.Tensor:
    """The teacher's top-1 next token at every position of full rows: (B, T) ids -> (B, T) int64 ids."""
    with autocast if autocast is not None else contextlib.nullcontext():
        return teacher(tokens).argmax(-1)


@dataclass(kw_only=True)
class TeacherLink:
    """Who serves whom: ranks 0..S-1 are students (the mesh's row-major order), S..S+T-1 teachers. Student rank r holds
    data-parallel slice r // (context x tensor); teacher j serves the slices d with d % T == j."""

    group: Any
    """A gloo backend over all S + T ranks, for the ids and the start step only."""
    store: Any
    """The rendezvous store (rank 0 may host it: kept alive with the link)."""
    rank: int
    mesh: MeshConfig
    n_teachers: int

    @property
    def n_students(self) -> int:
        return self.mesh.world_size

    @property
    def is_teacher(self) -> bool:
        return self.rank >= self.n_students

    def teacher_of(self, dp_rank: int) -> int:
        return self.n_students + dp_rank % self.n_teachers

    def students_of(self, dp_rank: int) -> range:
        per = self.mesh.context * self.mesh.tensor
        return range(dp_rank * per, (dp_rank + 1) * per)

    def start_step(self, step: int = 0) -> int:
        """Student rank 0's resume step, on every rank (students pass the step they resume at)."""
        t = torch.tensor([step], dtype=torch.int64)
        self.group.broadcast([t], dist.BroadcastOptions()).wait()  # root 0 by default
        return int(t.item())

    def recv_top1(self, dp_rank: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        ids = torch.empty(shape, dtype=torch.int64)
        self.group.recv([ids], self.teacher_of(dp_rank), TAG).wait()
        return ids.to(device)


def connect(*, mesh: MeshConfig, n_teachers: int, backend: str, timeout: timedelta) -> TeacherLink:
    """Join the rendezvous torchrun describes (env://): the students' default process group (when S > 1) and the
    gloo group for the ids over every rank."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world != mesh.world_size + n_teachers:
        raise PippinError(f"mesh {mesh.describe()} ({mesh.world_size} processes) plus teacher_ranks {n_teachers} needs "
                          f"{mesh.world_size + n_teachers} processes, but {world} were launched: use torchrun "
                          f"--nproc-per-node {mesh.world_size + n_teachers}")  # fmt: skip
    if n_teachers > mesh.dp_size:
        raise PippinError(f"teacher_ranks {n_teachers} is more than the data-parallel slices (data x fsdp = "
                          f"{mesh.dp_size}); each teacher rank serves whole slices: use at most {mesh.dp_size}")  # fmt: skip
    if dist.is_initialized():
        raise PippinError("teacher_ranks: start the processes with torchrun and let run_pretrain join the group itself")
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    if rank < mesh.world_size and mesh.world_size > 1:
        students = dist.PrefixStore("pippin/students", store)
        dist.init_process_group(backend, store=students, rank=rank, world_size=mesh.world_size, timeout=timeout)
    group = dist.ProcessGroupGloo(dist.PrefixStore("pippin/teacher", store), rank, world, timeout)
    return TeacherLink(group=group, store=store, rank=rank, mesh=mesh, n_teachers=n_teachers)


def serve_teacher(link: TeacherLink, config: Any, device: torch.device, autocast: Any) -> int:
    """A teacher rank's whole job: for each step from the students' resume step on, the top-1 ids of every slice it
    serves, sent to each student rank of the slice. Returns the number of steps served. config: a PretrainConfig."""
    teacher = load_model(config.teacher).model.to(device).eval().requires_grad_(False)
    shards = read_shards(config.data)
    start = link.start_step()
    j = link.rank - link.n_students
    loaders = {
        d: GlobalBatches(shards, seq_len=config.seq_len, global_batch=config.global_batch, seed=config.seed,
                         dp_rank=d, dp_size=link.mesh.dp_size)
        for d in range(j, link.mesh.dp_size, link.n_teachers)
    }  # fmt: skip
    in_flight: list[list[Any]] = []
    for step in range(start, config.steps):
        works = []
        for d, loader in loaders.items():
            ids = teacher_top1(teacher, loader.local(step)[:, :-1].to(device), autocast).cpu()
            works += [link.group.send([ids], r, TAG) for r in link.students_of(d)]
        in_flight.append(works)
        if len(in_flight) > AHEAD:
            for w in in_flight.pop(0):
                w.wait()
    for works in in_flight:
        for w in works:
            w.wait()
    return config.steps - start
