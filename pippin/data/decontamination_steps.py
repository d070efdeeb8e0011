"""Decontamination of pretraining documents against every evaluation set in the shared data folder, as two datatrove
steps that apply AFM's rule (reference/afm.md 2.1): a whole document is dropped when it shares an n-gram with an
evaluation text, unless that n-gram is "common usage", found in at least `common_threshold` documents of the corpus.

`DecontaminationScan` (with the filters, before dedup) records each document's colliding n-grams in its metadata and
writes per-task counts; `Decontaminate` (after dedup) sums every task's counts and drops the documents that hold a
rare one. n = 13 words, and texts of 8-12 words are matched whole (pippin.data.decontaminate). The evaluation sets are
read from their folder at run time, never copied.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from pippin.data.decontaminate import NGRAM, NGramIndex
from pippin.data.report import ExampleLog
from pippin.errors import PippinError
from pippin.io import write_json_atomic

MIN_N = 8
"""Evaluation texts shorter than NGRAM words are indexed whole from this many words (GPT-3's lower bound)."""


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open() as f:
        yield from (json.loads(line) for line in f if line.strip())


def _csv(path: Path) -> Iterator[dict]:
    with path.open(newline="") as f:
        yield from csv.DictReader(f)


def _mt_bench(folder: Path) -> Iterator[str]:
    for q in _jsonl(folder / "question.jsonl"):
        yield from q["turns"]
        yield from q.get("reference", [])
    for ref in sorted((folder / "reference_answer").glob("*.jsonl")):
        for a in _jsonl(ref):
            for c in a["choices"]:
                yield from c["turns"]


# Each evaluation set: the texts a model could have seen in training (prompts, inputs, references).
EVAL_SETS = {
    "ifeval": lambda d: (r["prompt"] for r in _jsonl(d / "input_data.jsonl")),
    "mt_bench": _mt_bench,
    "xsum": lambda d: (t for r in _jsonl(d / "test.jsonl") for t in (r["document"], r["summary"])),
    "dialogsum": lambda d: (r[k] for r in _jsonl(d / "dialogsum.test.jsonl") for k in ("dialogue", "summary1", "summary2", "summary3")),
    "dialsummeval": lambda d: (t for r in _jsonl(d / "human_judgment.jsonl") for t in (r["dialogue"], r["summary"])),
    "alpaca_eval": lambda d: (
        t for r in json.loads((d / "gpt4_1106_preview_model_outputs.json").read_text()) for t in (r["instruction"], r["output"])
    ),
    "advbench": lambda d: (r["goal"] for r in _csv(d / "harmful_behaviors.csv")),
    "xstest": lambda d: (r["prompt"] for r in _csv(d / "xstest_prompts.csv")),
    "eq_bench_creative_writing": lambda d: (
        t
        for v in json.loads((d / "creative_writing_prompts.json").read_text()).values()
        for t in (v["writing_prompt"], v["reference_output"])
    ),
}


@functools.lru_cache(maxsize=2)
def load_eval_index(data_dir: str | Path, sets: tuple[str, ...] | None = None) -> tuple[NGramIndex, dict[str, int]]:
    """The n-gram index of the evaluation sets found in `data_dir` (all known ones, or `sets`), and how many texts
    each set gave. A named set that is missing is an error; with `sets=None`, missing sets are skipped. Cached: the
    local executor builds it once and its forked tasks share it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PippinError(f"evaluation data folder {data_dir} does not exist; pass --eval-data or set eval_data in the pipeline file")
    unknown = set(sets or ()) - set(EVAL_SETS)
    if unknown:
        raise PippinError(f"unknown evaluation sets {sorted(unknown)}; known: {sorted(EVAL_SETS)}")
    index, counts = NGramIndex(n=NGRAM, min_n=MIN_N), {}
    for name in sets or EVAL_SETS:
        folder = data_dir / name
        if not folder.is_dir():
            if sets:
                raise PippinError(f"evaluation set {name} is not in {data_dir}")
            continue
        texts = [t for t in EVAL_SETS[name](folder) if isinstance(t, str)]
        index.add(texts, source=name)
        counts[name] = len(texts)
    if not counts:
        raise PippinError(f"no evaluation set found in {data_dir} (looked for {sorted(EVAL_SETS)})")
    return index, counts


class DecontaminationScan(PipelineStep):
    """Marks documents that share an n-gram with an evaluation text (`metadata["eval_ngrams"]`: each n-gram, its words
    joined by spaces, and the set it came from) and writes, per task, in how many documents each such n-gram was
    seen (`counts_folder/<rank>.json`).
    Drops nothing."""

    type = "🧼 - DECONT"
    name = "🔎 Eval n-gram scan"

    def __init__(self, eval_data: str, counts_folder: str, sets: tuple[str, ...] | None = None):
        super().__init__()
        self.eval_data, self.counts_folder, self.sets = eval_data, Path(counts_folder), sets
        self._index: NGramIndex | None = None

    @property
    def index(self) -> NGramIndex:
        if self._index is None:  # built in the task's process, not pickled to it
            self._index = load_eval_index(self.eval_data, self.sets)[0]
        return self._index

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: Counter[str] = Counter()
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                grams = {" ".join(g): self.index.sources[g] for g in sorted(self.index.all_shared(doc.text))}
                if grams:
                    self.stat_update("docs_with_eval_ngrams")
                    doc.metadata["eval_ngrams"] = grams  # n-gram -> evaluation set
                    counts.update(grams.keys())
            self.stat_update("forwarded")
            yield doc
        write_json_atomic(self.counts_folder / f"{rank:05d}.json", dict(sorted(counts.items())))


class Decontaminate(PipelineStep):
    """Drops a document holding an evaluation n-gram seen in fewer than `common_threshold` documents of the corpus
    (all tasks' scan counts summed); the reason names the evaluation set."""

    type = "🧼 - DECONT"
    name = "🧼 Decontaminate"

    def __init__(self, counts_folder: str, common_threshold: int = 1000, examples: ExampleLog | None = None):
        super().__init__()
        self.counts_folder, self.common_threshold, self.examples = Path(counts_folder), common_threshold, examples

    def common(self) -> set[str]:
        total: Counter[str] = Counter()
        for f in sorted(self.counts_folder.glob("*.json")):
            total.update(json.loads(f.read_text()))
        return {g for g, c in total.items() if c >= self.common_threshold}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        common = self.common()
        with self.examples or contextlib.nullcontext():
            for doc in data:
                self.stat_update("total")
                with self.track_time():
                    rare = {g: src for g, src in doc.metadata.pop("eval_ngrams", {}).items() if g not in common}
                if rare:
                    reason = "eval_" + "+".join(sorted(set(rare.values())))
                    self.stat_update("dropped", f"dropped_{reason}")
                    if self.examples:
                        self.examples.note(reason, f"[{next(iter(rare))}] in: {doc.text}", rank)
                    continue
                self.stat_update("forwarded")
                yield doc
