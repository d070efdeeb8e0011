"""Build and run the pipeline's datatrove stages from a PipelineConfig (pippin.data.pipeline).

filter (tasks): read, language, quality, PII, safety, eval n-gram scan, write the survivors as JSONL, MinHash signatures;
minhash_buckets (one task per band) and minhash_cluster (one task): datatrove's stages 2 and 3;
pack (tasks): task r reads task r's survivors, drops MinHash duplicates, decontaminates, tokenizes into shards;
finalize (one task): merges the partial shard indexes in task order and writes report.json.
Each stage is one executor that depends on the one before, so the same chain runs locally, on Slurm or on Ray.
Not here: the steps themselves (filters, pii, decontamination_steps, packing) and the config (pipeline).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.executor import RayPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.stats import PipelineStats

from pippin.data.decontamination_steps import Decontaminate, DecontaminationScan, load_eval_index
from pippin.data.filters import LanguageFilter, SafetyFilter
from pippin.data.packing import PackShards, partial_index
from pippin.data.pii import PIIRedactor
from pippin.data.pipeline import STAGES, PipelineConfig
from pippin.data.readers import InputReader
from pippin.data.report import ExampleLog, example_key, format_table, step_rows
from pippin.data.shards import merge_indexes
from pippin.io import write_atomic, write_json_atomic

REPORT_FILE = "report.json"


class RankJsonlReader(JsonlReader):
    """Task r reads exactly `<r>.jsonl.gz`, the file task r of the filter stage wrote (an empty task writes none),
    so MinHash's per-task document numbers line up."""

    name = "📖 Read filtered"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl.gz"
        if self.data_folder.isfile(name):
            for doc in self.read_file(name):
                self.stat_update("total")
                yield doc


class Finalize(PipelineStep):
    """Merges the pack stage's partial shard indexes into shards.json (task order) and writes the removal report."""

    type = "🏁 - FINAL"
    name = "🏁 Finalize"

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out, work = Path(self.config["output"]), Path(self.config["output"]) / "work"
        index = merge_indexes(out, [partial_index(r) for r in range(self.config["tasks"])], meta={"pipeline": "pipeline.json"})
        report = build_report(work, json.loads(index.read_text()))
        write_json_atomic(out / REPORT_FILE, report)
        write_atomic(out / "report.txt", (format_table(report["steps"]) + "\n").encode())
        return
        yield


def stage_stats(logging_dir: Path) -> Path | None:
    """The stage's statistics summed over its tasks (datatrove writes one file per task), as a stats.json."""
    files = sorted((logging_dir / "stats").glob("*.json"))
    if not files:
        return None
    total = sum((PipelineStats.from_json(json.loads(f.read_text())) for f in files), start=PipelineStats())
    merged = logging_dir / "stats.merged.json"
    write_atomic(merged, total.to_json().encode())
    return merged


def build_report(work: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Every step's row (in pipeline order), and the token and document counts of the shards."""
    steps = []
    for stage in STAGES[:-1]:
        if merged := stage_stats(work / "logs" / stage):
            steps += [dict(r, stage=stage) for r in step_rows(merged, work / "examples")]
    return {"n_tokens": index["n_tokens"], "n_documents": index["n_documents"], "n_shards": len(index["shards"]), "steps": steps}


def _examples(config: PipelineConfig, step_name: str) -> ExampleLog:
    return ExampleLog(config.work / "examples" / example_key(step_name), config.examples_per_reason)


def build_stages(config: PipelineConfig) -> list[tuple[str, list[PipelineStep], int]]:
    """(stage name, steps, tasks) for each stage, in order. `config` should be resolved (absolute paths)."""
    work = config.work
    ex = lambda name: _examples(config, name)  # noqa: E731
    q = config.quality
    filters: list[PipelineStep] = [InputReader(config.inputs, split_chars=config.split_chars)]
    if config.language:
        filters.append(
            LanguageFilter(tuple(config.language.languages), config.language.min_score, exclusion_writer=ex(LanguageFilter.name))
        )
    for cls, kwargs in (
        (GopherRepetitionFilter, q.gopher_repetition),
        (GopherQualityFilter, q.gopher_quality),
        (C4QualityFilter, q.c4),
        (FineWebQualityFilter, q.fineweb),
    ):
        if kwargs is not None:
            filters.append(cls(**kwargs, exclusion_writer=ex(cls.name)))
    if config.pii:
        filters.append(PIIRedactor(tuple(config.pii.kinds), examples=ex(PIIRedactor.name)))
    if config.safety:
        filters.append(
            SafetyFilter(config.safety.max_profanity_ratio, config.safety.min_profane_words, exclusion_writer=ex(SafetyFilter.name))
        )
    d = config.decontamination
    if d:
        filters.append(DecontaminationScan(config.eval_data, str(work / "decont_counts"), tuple(d.sets) if d.sets else None))
    filters.append(JsonlWriter(str(work / "filtered"), output_filename="${rank}.jsonl.gz"))
    stages: list[tuple[str, list[PipelineStep], int]] = []
    pack: list[PipelineStep] = [RankJsonlReader(str(work / "filtered"))]
    if config.dedup:
        mh = MinhashConfig(
            n_grams=config.dedup.n_grams,
            num_buckets=config.dedup.num_buckets,
            hashes_per_bucket=config.dedup.hashes_per_bucket,
            seed=config.dedup.seed,
            hash_config=HashConfig(precision=64),
        )
        filters.append(MinhashDedupSignature(str(work / "minhash" / "signatures"), config=mh))
        stages.append(("filter", filters, config.tasks))
        stages.append(
            (
                "minhash_buckets",
                [MinhashDedupBuckets(str(work / "minhash" / "signatures"), str(work / "minhash" / "buckets"), config=mh)],
                mh.num_buckets,
            )
        )
        stages.append(
            ("minhash_cluster", [MinhashDedupCluster(str(work / "minhash" / "buckets"), str(work / "minhash" / "remove"), config=mh)], 1)
        )
        pack.append(MinhashDedupFilter(str(work / "minhash" / "remove"), exclusion_writer=ex(MinhashDedupFilter.name)))
    else:
        stages.append(("filter", filters, config.tasks))
    if d:
        pack.append(Decontaminate(str(work / "decont_counts"), d.common_threshold, examples=ex(Decontaminate.name)))
    p = config.packing
    pack.append(PackShards(config.output, tokenizer=p.tokenizer, eos_token=p.eos_token, shard_tokens=p.shard_tokens))
    stages.append(("pack", pack, config.tasks))
    stages.append(("finalize", [Finalize({"output": config.output, "tasks": config.tasks})], 1))
    return stages


_fork_hook_registered = False


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class RayExecutor(RayPipelineExecutor):
    """datatrove's Ray executor, with forked children that die on SIGTERM.

    Each Ray task runs its ranks in a pool forked from the Ray worker, and closing the pool SIGTERMs its processes. A
    fork inherits Ray's SIGTERM handler, which raises SystemExit and runs Ray's atexit shutdown in the child; a child
    caught waiting on the pool's queue lock then never exits and the task hangs. Unpickling the executor in the worker
    registers a fork hook that restores the default action in the children.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _fork_hook_registered
        self.__dict__.update(state)
        if not _fork_hook_registered:
            os.register_at_fork(after_in_child=_default_sigterm)
            _fork_hook_registered = True


def make_executors(config: PipelineConfig) -> list[Any]:
    """One datatrove executor per stage, each depending on the one before; the last one's run() runs them all."""
    executors: list[Any] = []
    for name, steps, tasks in build_stages(config):
        common = {
            "pipeline": steps,
            "tasks": tasks,
            "logging_dir": str(config.work / "logs" / name),
            "depends": executors[-1] if executors else None,
        }
        if config.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            # fork, not datatrove's forkserver: the steps are plain Python and a fork skips re-importing spaCy and co.
            kwargs = {"start_method": "fork", **config.executor_args}
            executors.append(LocalPipelineExecutor(**common, workers=min(config.workers, tasks), **kwargs))
        elif config.executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            executors.append(
                SlurmPipelineExecutor(**common, job_name=f"pippin-data-{name}", workers=config.workers, **config.executor_args)
            )
        else:
            executors.append(RayExecutor(**common, workers=config.workers, **config.executor_args))
    return executors


def run_pipeline(config: PipelineConfig) -> dict[str, Any] | None:
    """Run (or resume) the pipeline; returns the report, or None when jobs were submitted to Slurm (Ray runs them
    from this process, on the cluster `ray.init` finds or on a local one it starts)."""
    from pippin.data.pipeline import check_run_folder

    config = config.resolved()
    check_run_folder(config)
    if config.decontamination:  # fails early on a bad eval_data; local tasks fork with the index already built
        d = config.decontamination.sets
        load_eval_index(config.eval_data, tuple(d) if d else None)
    executors = make_executors(config)
    executors[-1].run()
    report = Path(config.output) / REPORT_FILE
    return json.loads(report.read_text()) if config.executor != "slurm" and report.is_file() else None
