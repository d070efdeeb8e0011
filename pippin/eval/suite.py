"""What every benchmark suite shares: its inputs (`EvalContext`), its output (`SuiteResult`) and row loading.

A suite is a module in pippin.eval.tasks with `run(ctx) -> SuiteResult`. Dataset rows are read from files in
`ctx.data_dir` one at a time: a malformed row becomes an `ItemError` at stage "data" and the others still run, so
one bad line never stops an evaluation and never counts as a pass or a fail. Generation and judge failures are
ItemErrors too (stages "generate" and "judge"); every metric is computed over the items without errors and
reports its own `n`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.eval.forms import AnswerForm
from pippin.eval.judges import JudgeConfig, Judgment, judge_all
from pippin.eval.runner import GenerationCache, Outcome, Request, run_requests
from pippin.eval.systems import System

T = TypeVar("T")


@dataclass(kw_only=True)
class ItemError:
    """Why one item has no score: its stage ("data", "generate", "judge"), the item, the system, the message."""

    stage: str
    item: str
    message: str
    system: str | None = None


@dataclass(kw_only=True)
class SuiteResult:
    suite: str
    metrics: dict[str, dict[str, float | None]]
    """Row (a system spec, or "A vs B" for side-by-side suites) -> metric name -> value (None: nothing to score)."""
    headline: list[str]
    """The metrics worth a plot, in order."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Everything needed to reproduce the numbers: systems, judge, sampling, templates, data files, limit."""
    items: list[dict[str, Any]] = field(default_factory=list)
    """Per-item records (prompt id, system, reply, judgment) for inspection."""
    errors: list[ItemError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error_counts(self) -> dict[str, int]:
        return dict(Counter(f"{e.stage}" + (f" [{e.system}]" if e.system else "") for e in self.errors))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "error_counts": self.error_counts()}


class Split(Enum):
    """Which part of a data set that also feeds training (safety's AdvBench and XSTest) a suite evaluates."""

    TEST = "test"
    """The held-out part, never trained on: the default."""
    TRAIN = "train"
    """The part the training data is built from (to compare with TEST, never as a result)."""
    ALL = "all"


@dataclass(kw_only=True)
class EvalContext:
    """The systems, judge, data and run settings a suite works with."""

    systems: list[System]
    data_dir: Path
    against: System | None = None
    judge: System | None = None
    limit: int | None = None
    """At most this many items per dataset (None: all)."""
    split: Split = Split.TEST
    """Suites whose data also feeds training (safety): the part to evaluate."""
    cache: GenerationCache | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    """None: the suite's default."""
    temperature: float | None = None
    """None: the suite's default (greedy, or MT-Bench's per-category temperatures)."""
    seed: int | None = 0
    judge_config: JudgeConfig = field(default_factory=JudgeConfig)
    progress: bool = False

    def sampling(self, *, max_new_tokens: int, temperature: float = 0.0) -> SamplingParams:
        """The settings for the systems under test: the user's choices over the suite's defaults."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else max_new_tokens,
            temperature=self.temperature if self.temperature is not None else temperature,
            seed=self.seed,
        )

    def generate(self, system: System, requests: Sequence[Request], params: SamplingParams, *, desc: str = "generate") -> list[Outcome]:
        return run_requests(system, requests, params, cache=self.cache, batch_size=self.batch_size, progress=self.progress, desc=desc)

    def require_judge(self, suite: str) -> System:
        if self.judge is None:
            raise PippinError(f"The {suite} suite needs a judge; pass --judge SPEC (e.g. --judge openai:http://127.0.0.1:8080/v1#judge).")
        return self.judge

    def judge_all(
        self,
        requests: Sequence[Request],
        parse: Callable[[str], Any] | Sequence[Callable[[str], Any]],
        *,
        forms: AnswerForm | Sequence[AnswerForm] | None = None,
        desc: str = "judge",
    ) -> list[Judgment]:
        judge = self.require_judge(desc)
        return judge_all(
            judge,
            requests,
            parse,
            config=self.judge_config,
            cache=self.cache,
            batch_size=self.batch_size,
            progress=self.progress,
            desc=desc,
            forms=forms,
        )

    def path(self, *parts: str) -> Path:
        path = self.data_dir.joinpath(*parts)
        if not path.exists():
            raise PippinError(f"{path} does not exist; pass --data with the folder that holds the evaluation data sets.")
        return path

    def describe(self) -> dict[str, Any]:
        return {
            "systems": [s.spec for s in self.systems],
            "system_identities": [s.identity for s in self.systems],
            "against": self.against.spec if self.against else None,
            "judge": self.judge.spec if self.judge else None,
            "judge_settings": self.judge_config.describe() if self.judge else None,
            "limit": self.limit,
            "data_dir": str(self.data_dir),
        }


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, raw row) pairs from a JSONL, JSON (list or object) or CSV file; an unparseable JSONL line is
    kept as a JSONDecodeError in place of its row, so the caller can record it."""
    name = path.name
    if path.suffix == ".jsonl":
        out: list[tuple[str, Any]] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{name}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"{name}:{n}", e))
        return out
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [(f"{name}:{n}", row) for n, row in enumerate(csv.DictReader(f), start=2)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PippinError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from None
    if isinstance(data, dict):
        return [(f"{name}[{k}]", v) for k, v in data.items()]
    if isinstance(data, list):
        return [(f"{name}[{i}]", v) for i, v in enumerate(data)]
    raise PippinError(f"{path} holds a JSON {type(data).__name__}; expected a list or an object of rows.")


def parse_rows(records: Sequence[tuple[str, Any]], parse: Callable[[str, Any], T], *, limit: int | None) -> tuple[list[T], list[ItemError]]:
    """Apply `parse(location, row)` to the first `limit` records; a row that fails becomes a data ItemError."""
    items, errors = [], []
    for where, row in records[:limit] if limit is not None else records:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"not valid JSON ({row})")
            items.append(parse(where, row))
        except (PippinError, ValueError, KeyError, TypeError, AttributeError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            errors.append(ItemError(stage="data", item=where, message=f"malformed row: {detail}"))
    return items, errors


def require_str(row: Any, *fields: str) -> list[str]:
    """The named fields of a row, each checked to be a non-empty string."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    values = []
    for f in fields:
        v = row[f]
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"field {f!r} must be a non-empty string")
        values.append(v)
    return values


def percent(num: float, den: int) -> float | None:
    """num/den in percent, or None when there is nothing to divide by."""
    return 100.0 * num / den if den else None


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generation_errors(system: System, outcomes: Sequence[Outcome]) -> list[ItemError]:
    """The failed generations of one system, as recorded errors (never scored)."""
    return [ItemError(stage="generate", item=o.id, system=system.spec, message=o.error) for o in outcomes if not o.ok]
