"""The runner: batched generation through any System, cached in an append-only JSONL file, resumable after a kill.

Every request is keyed by (system identity, sampling settings, SHA-256 of the chat messages). A batch's
records are appended and fsynced as soon as it finishes, so a killed run loses at most the batch in flight; on
load a partial last line (the kill landed mid-write) is cut off and ignored, and unreadable lines are skipped
and counted. Failures never become replies: an unreachable endpoint (EndpointError) turns the batch into error
outcomes; any other PippinError splits the batch so that only the rows that fail are errors. Errors are written
to the file for the record but never served from it, so the next run retries them. Judges use the same runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.eval.forms import AnswerForm, Filled
from pippin.eval.systems import EndpointError, Message, System, can_fill, sampling_dict


@dataclass(kw_only=True)
class Request:
    """One generation to make: an id for the report and the conversation to continue."""

    id: str
    messages: list[Message]
    form: AnswerForm | None = None
    """Answer in this form by forced choice instead of generating (for systems that `can_fill`)."""


@dataclass(kw_only=True)
class Outcome:
    """The reply to one Request, or why there is none."""

    id: str
    text: str | None = None
    error: str | None = None
    cached: bool = False
    probs: list[list[float]] | None = None
    """For a forced-form answer: each option's probability at each choice."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


def prompt_hash(messages: Sequence[Message]) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_key(identity: str, settings: dict, prompt_sha: str) -> str:
    blob = json.dumps({"system": identity, "sampling": settings, "prompt": prompt_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class GenerationCache:
    """Replies on disk, one JSON object per line, found by `cache_key`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.n_ignored = 0
        """Lines that could not be used: a partial last line, or a line that is not a cache record."""
        self._replies: dict[str, str] = {}
        self._probs: dict[str, list[list[float]]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # killed mid-write: drop the partial tail so the next append starts on a fresh line
            with self.path.open("r+b") as f:
                f.truncate(end)
            self.n_ignored += 1
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.n_ignored += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                self.n_ignored += 1
            elif isinstance(rec.get("text"), str) and rec.get("error") is None:
                self._keep(rec)

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def probs(self, key: str) -> list[list[float]] | None:
        """The option probabilities stored with a forced-form answer."""
        return self._probs.get(key)

    def _keep(self, rec: dict) -> None:
        self._replies[rec["key"]] = rec["text"]
        if isinstance(rec.get("choice_probs"), list):
            self._probs[rec["key"]] = rec["choice_probs"]

    def append(self, records: Sequence[dict]) -> None:
        """Append records and fsync: after this returns they survive a kill."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            if r.get("error") is None and isinstance(r.get("text"), str):
                self._keep(r)


Row = tuple[str | None, str | None, list[list[float]] | None]
"""(text, error, option probabilities) of one generated row."""


def _generate_rows(
    system: System, conversations: list[list[Message]], params: SamplingParams, forms: list[AnswerForm] | None = None
) -> list[Row]:
    """One Row per conversation: one batched call, split into single rows if a row-level error occurs.
    With `forms`, the rows are answered in those forms (`system.fill`) instead of generated."""
    try:
        if forms is not None:
            filled = system.fill(conversations, forms)
            if not isinstance(filled, list) or len(filled) != len(conversations) or not all(isinstance(f, Filled) for f in filled):
                raise PippinError(f"{system.spec} returned {type(filled).__name__} instead of {len(conversations)} filled forms.")
            return [(f.text, None, f.probs) for f in filled]
        texts = system.generate(conversations, params)
        if not isinstance(texts, list) or len(texts) != len(conversations) or not all(isinstance(t, str) for t in texts):
            raise PippinError(f"{system.spec} returned {type(texts).__name__} instead of {len(conversations)} strings.")
        return [(t, None, None) for t in texts]
    except EndpointError as e:
        return [(None, str(e), None)] * len(conversations)
    except PippinError as e:
        if len(conversations) == 1:
            return [(None, str(e), None)]
    return [row for i, c in enumerate(conversations) for row in _generate_rows(system, [c], params, None if forms is None else [forms[i]])]


def run_requests(
    system: System,
    requests: Sequence[Request],
    params: SamplingParams,
    *,
    cache: GenerationCache | None = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generate",
) -> list[Outcome]:
    """One Outcome per request, in order: cached replies first, the rest generated `batch_size` at a time (or the
    system's `chunk_size`, when it has one and it is larger; each chunk is saved when it finishes).

    Requests with a form are answered in it by forced choice (the system must `can_fill`); their cache key and
    record hold the form instead of the sampling settings. A batch is all forms or all free generations.
    """
    forced = [r.form is not None for r in requests]
    if any(forced) and not can_fill(system):
        raise PippinError(f"{system.spec} cannot answer in a forced form; ask it in free text.")
    settings = [{"answer_form": r.form.spec} if r.form is not None else sampling_dict(params) for r in requests]
    shas = [prompt_hash(r.messages) for r in requests]
    keys = [cache_key(system.identity, st, s) for st, s in zip(settings, shas)]
    replies: dict[str, Row] = {}
    cached = set()
    todo: list[int] = []  # first request of each key that must be generated (duplicates share it)
    for i, k in enumerate(keys):
        if k in replies or k in cached:
            continue
        hit = cache.get(k) if cache is not None else None
        if hit is not None:
            cached.add(k)
            replies[k] = (hit, None, cache.probs(k))
        else:
            replies[k] = (None, "not generated", None)
            todo.append(i)
    per_key = Counter(keys)  # requests answered by each key's one generation
    n_done = sum(per_key[k] for k in cached)
    bar = tqdm(total=len(requests), initial=n_done, desc=f"{desc} [{system.spec}]", disable=not progress, file=sys.stderr, leave=False)
    free, filled = [i for i in todo if not forced[i]], [i for i in todo if forced[i]]
    step = max(batch_size, getattr(system, "chunk_size", 0))  # a continuously batching system wants more than its rows
    batches = [group[b : b + step] for group in (free, filled) for b in range(0, len(group), step)]
    for batch in batches:
        rows = _generate_rows(
            system, [list(requests[i].messages) for i in batch], params, [requests[i].form for i in batch] if forced[batch[0]] else None
        )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        records = []
        for i, (text, error, probs) in zip(batch, rows):
            replies[keys[i]] = (text, error, probs)
            records.append(
                {
                    "key": keys[i],
                    "system": system.spec,
                    "identity": system.identity,
                    "sampling": settings[i],
                    "prompt_sha": shas[i],
                    "messages": requests[i].messages,
                    "text": text,
                    "error": error,
                    "time": stamp,
                    **({"choice_probs": probs} if probs is not None else {}),
                }
            )
        if cache is not None:
            cache.append(records)
        bar.update(sum(per_key[keys[i]] for i in batch))
    bar.close()
    return [
        Outcome(id=r.id, text=replies[k][0], error=replies[k][1], cached=k in cached, probs=replies[k][2]) for r, k in zip(requests, keys)
    ]
