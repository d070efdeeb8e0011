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
from pippin.eval.systems import EndpointError, Message, System, sampling_dict


@dataclass(kw_only=True)
class Request:
    """One generation to make: an id for the report and the conversation to continue."""

    id: str
    messages: list[Message]


@dataclass(kw_only=True)
class Outcome:
    """The reply to one Request, or why there is none."""

    id: str
    text: str | None = None
    error: str | None = None
    cached: bool = False

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
                self._replies[rec["key"]] = rec["text"]

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

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
                self._replies[r["key"]] = r["text"]


def _generate_rows(system: System, conversations: list[list[Message]], params: SamplingParams) -> list[tuple[str | None, str | None]]:
    """(text, error) per conversation: one batched call, split into single rows if a row-level error occurs."""
    try:
        texts = system.generate(conversations, params)
        if not isinstance(texts, list) or len(texts) != len(conversations) or not all(isinstance(t, str) for t in texts):
            raise PippinError(f"{system.spec} returned {type(texts).__name__} instead of {len(conversations)} strings.")
        return [(t, None) for t in texts]
    except EndpointError as e:
        return [(None, str(e))] * len(conversations)
    except PippinError as e:
        if len(conversations) == 1:
            return [(None, str(e))]
    return [row for c in conversations for row in _generate_rows(system, [c], params)]


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
    """One Outcome per request, in order: cached replies first, the rest generated `batch_size` at a time."""
    settings = sampling_dict(params)
    shas = [prompt_hash(r.messages) for r in requests]
    keys = [cache_key(system.identity, settings, s) for s in shas]
    replies: dict[str, tuple[str | None, str | None]] = {}
    cached = set()
    todo: list[int] = []  # first request of each key that must be generated (duplicates share it)
    for i, k in enumerate(keys):
        if k in replies or k in cached:
            continue
        hit = cache.get(k) if cache is not None else None
        if hit is not None:
            cached.add(k)
            replies[k] = (hit, None)
        else:
            replies[k] = (None, "not generated")
            todo.append(i)
    per_key = Counter(keys)  # requests answered by each key's one generation
    n_done = sum(per_key[k] for k in cached)
    bar = tqdm(total=len(requests), initial=n_done, desc=f"{desc} [{system.spec}]", disable=not progress, file=sys.stderr, leave=False)
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        rows = _generate_rows(system, [list(requests[i].messages) for i in batch], params)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        records = []
        for i, (text, error) in zip(batch, rows):
            replies[keys[i]] = (text, error)
            records.append(
                {
                    "key": keys[i],
                    "system": system.spec,
                    "identity": system.identity,
                    "sampling": settings,
                    "prompt_sha": shas[i],
                    "messages": requests[i].messages,
                    "text": text,
                    "error": error,
                    "time": stamp,
                }
            )
        if cache is not None:
            cache.append(records)
        bar.update(sum(per_key[keys[i]] for i in batch))
    bar.close()
    return [Outcome(id=r.id, text=replies[k][0], error=replies[k][1], cached=k in cached) for r, k in zip(requests, keys)]
