"""The pretraining data pipeline: offline text in, memory-mapped token shards and a removal report out.

Steps, in order: read (JSONL / text), language identification, Gopher repetition and quality, C4 and FineWeb quality
(datatrove's filters with FineWeb's settings), PII redaction, profanity / unsafe filtering, an evaluation n-gram scan,
MinHash fuzzy dedup (datatrove's four stages), decontamination (AFM's rule), tokenization into shards. They run as
five datatrove stages (filter, minhash buckets, minhash clusters, pack, finalize) on datatrove's local executor, or,
unchanged, on its Slurm or Ray executor; datatrove marks finished tasks, so a killed run resumes where it stopped.
Deterministic: for given inputs, settings and `tasks`, the shards and counts are the same whatever `workers` is (each
task owns a fixed run of input files and the shards are listed in task order). `tasks` itself changes which
near-duplicate of a cluster is kept. Configured by a JSON file (PipelineConfig); follows FineWeb's datatrove recipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pippin.errors import PippinError
from pippin.io import write_json_atomic

EXECUTORS = ("local", "slurm", "ray")
STAGES = ("filter", "minhash_buckets", "minhash_cluster", "pack", "finalize")


def default_eval_data() -> Path:
    """$PIPPIN_EVAL_DATA, else ../shared/data next to the repository (the Makefile's SHARED)."""
    if env := os.environ.get("PIPPIN_EVAL_DATA"):
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass(kw_only=True)
class LanguageConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Languages to keep (ISO 639-1 codes, as langdetect names them)."""
    min_score: float = 0.65
    """Least langdetect probability of the top language (FineWeb keeps English at 0.65 with fastText)."""


@dataclass(kw_only=True)
class QualityConfig:
    """Keyword arguments of datatrove's filters; null switches one off. Defaults are FineWeb's."""

    gopher_repetition: dict | None = field(default_factory=dict)
    """datatrove GopherRepetitionFilter (duplicate lines/paragraphs, top n-gram shares)."""
    gopher_quality: dict | None = field(default_factory=dict)
    """datatrove GopherQualityFilter (word counts and lengths, symbols, bullets, stop words)."""
    c4: dict | None = field(default_factory=lambda: {"filter_no_terminal_punct": False})
    """datatrove C4QualityFilter (javascript, policy, lorem ipsum, curly brackets, short lines)."""
    fineweb: dict | None = field(default_factory=dict)
    """datatrove FineWebQualityFilter (line punctuation, short lines, duplicated characters, newlines)."""


@dataclass(kw_only=True)
class PIIConfig:
    kinds: list[str] = field(default_factory=lambda: ["email", "credit_card", "iban", "us_ssn", "ip", "phone"])
    """What to redact (pippin.data.pii.KINDS)."""


@dataclass(kw_only=True)
class SafetyConfig:
    max_profanity_ratio: float = 0.01
    """Drop a document when more than this share of its words are profane ..."""
    min_profane_words: int = 3
    """... and it has at least this many of them."""


@dataclass(kw_only=True)
class DedupConfig:
    """datatrove MinHash: n_grams-word shingles, num_buckets bands of hashes_per_bucket hashes. 20 x 8 keeps a pair at
    Jaccard 0.8 with probability 1 - (1 - 0.8^8)^20 = 0.975 (FineWeb's 14 x 8: 0.924)."""

    n_grams: int = 5
    num_buckets: int = 20
    hashes_per_bucket: int = 8
    seed: int = 1
    """Seed of the hash permutations (the same on every task)."""


@dataclass(kw_only=True)
class DecontaminationConfig:
    sets: list[str] | None = None
    """Evaluation sets to check (folder names in eval_data); null: every known set found there."""
    common_threshold: int = 1000
    """An n-gram found in at least this many documents is common usage and drops nothing (AFM's threshold)."""


@dataclass(kw_only=True)
class PackingConfig:
    tokenizer: str = "default"
    """A converted model folder with tokenizer.json, or "default" (the default model under PIPPIN_HOME)."""
    eos_token: str = "<|endoftext|>"
    """The token written after every document."""
    shard_tokens: int = 1 << 24
    """A new shard file is started after this many tokens."""


@dataclass(kw_only=True)
class PipelineConfig:
    inputs: list[str]
    """Files or folders: JSONL rows with a `text` field (a crawl's output) or plain text files, gzipped or not."""
    output: str
    """Folder for the shards (shards.json), report.json, pipeline.json (the resolved config) and work/."""
    eval_data: str = ""
    """Folder of evaluation sets to decontaminate against; empty: $PIPPIN_EVAL_DATA or ../shared/data."""
    split_chars: int = 0
    """Cut text files and rows longer than this at blank lines into documents of about this size; 0: keep whole."""
    tasks: int = 2
    """Tasks the data is split into (part of the result: it sets which near-duplicate survives)."""
    workers: int = 2
    """Tasks run at once (not part of the result)."""
    executor: str = "local"
    """local, slurm or ray: datatrove's executor that runs the stages."""
    executor_args: dict = field(default_factory=dict)
    """Extra keyword arguments of the executor (for slurm: partition, time, cpus_per_task, ...)."""
    language: LanguageConfig | None = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PIIConfig | None = field(default_factory=PIIConfig)
    safety: SafetyConfig | None = field(default_factory=SafetyConfig)
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig | None = field(default_factory=DecontaminationConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    examples_per_reason: int = 3
    """Removed or redacted examples the report shows per reason."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise PippinError('the pipeline has no inputs; list files or folders under "inputs"')
        if self.executor not in EXECUTORS:
            raise PippinError(f"executor {self.executor!r} is not one of {EXECUTORS}")
        if self.tasks < 1 or self.workers < 1:
            raise PippinError("tasks and workers must be at least 1")

    @property
    def work(self) -> Path:
        return Path(self.output) / "work"

    def resolved(self) -> PipelineConfig:
        """A copy with absolute paths and eval_data filled in: what the run folder records."""
        d = asdict(self)
        d["inputs"] = [str(Path(p).resolve()) for p in self.inputs]
        d["output"] = str(Path(self.output).resolve())
        # resolved either way (../shared may be a symlink), so a resumed run's recorded config compares equal
        d["eval_data"] = str((Path(self.eval_data) if self.eval_data else default_eval_data()).resolve())
        return config_from_dict(d)


_SUB = {
    "language": LanguageConfig,
    "quality": QualityConfig,
    "pii": PIIConfig,
    "safety": SafetyConfig,
    "dedup": DedupConfig,
    "decontamination": DecontaminationConfig,
    "packing": PackingConfig,
}


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise PippinError(f"{where} must be a JSON object, not {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    if unknown := set(d) - known:
        raise PippinError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise PippinError(f"{where}: {e}") from None


def config_from_dict(d: dict[str, Any]) -> PipelineConfig:
    """A PipelineConfig from its JSON form; unknown keys and wrong shapes are errors that name the key."""
    if not isinstance(d, dict):
        raise PippinError("a pipeline file holds one JSON object")
    d = dict(d)
    for key, cls in _SUB.items():
        if d.get(key) is not None:
            d[key] = _build(cls, d[key], key)
    return _build(PipelineConfig, d, "the pipeline file")


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        return config_from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise PippinError(f"pipeline file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise PippinError(f"{path} is not JSON: {e}") from None


def check_run_folder(config: PipelineConfig) -> None:
    """Write pipeline.json into the output folder, or, when a run is there, check that it is the same run (only
    workers and executor settings may differ), so resuming never mixes the work of two settings."""
    path = Path(config.output) / "pipeline.json"
    new = asdict(config)
    if path.is_file():
        old = json.loads(path.read_text())
        loose = ("workers", "executor", "executor_args")
        if {k: v for k, v in old.items() if k not in loose} != {k: v for k, v in new.items() if k not in loose}:
            raise PippinError(f"{path.parent} holds a run with other settings (see its pipeline.json); use a new output folder")
    write_json_atomic(path, new)
