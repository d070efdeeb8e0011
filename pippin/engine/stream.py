"""The text layer over the engine: prompts or chat messages in, streamed text deltas and stats out.

Detokenizes incrementally (holding back an incomplete UTF-8 sequence), cuts at stop strings (holding
back text that may be the start of one), and ends with a `Final` record carrying the full text and the
engine's stats (prompt tokens, TTFT, prefill and decode tok/s). The engine below it only sees ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pippin.engine.engine import Engine, GenerationStats
from pippin.engine.sampling import SamplingParams
from pippin.model.tokenizer import Tokenizer


@dataclass(kw_only=True)
class Delta:
    text: str


@dataclass(kw_only=True)
class Final:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing chars might still grow into a stop string (shared with pippin.serve's text stream)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def stream_ids(
    engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *, adapter: str | None = None
) -> Iterator[Delta | Final]:
    """Stream the reply to one prompt given as ids (with the named LoRA adapter, if any)."""
    stop_ids = set(engine.eos_ids)
    ids: list[int] = []
    emitted = 0
    text = ""
    finish = "length"
    steps = engine.generate([prompt_ids], params, adapters=[adapter])
    for step in steps:
        tok = int(step.tokens[0])
        if not params.ignore_eos and tok in stop_ids:
            finish = "stop"
            break
        ids.append(tok)
        text = tokenizer.decode(ids)
        cut = min((text.find(s) for s in params.stop if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its next byte
            continue
        safe = len(text) - held_back(text, params.stop)
        if safe > emitted:
            yield Delta(text=text[emitted:safe])
            emitted = safe
    steps.close()  # finalises the engine's stats even when we stopped early
    if len(text) > emitted:
        yield Delta(text=text[emitted:])
    stats = engine.last_stats
    if finish == "stop":
        stats.finish_reasons = ["stop"]
    yield Final(text=text, token_ids=ids, finish_reason=finish, stats=stats)


def stream_text(
    engine: Engine, tokenizer: Tokenizer, prompt: str, params: SamplingParams, *, adapter: str | None = None
) -> Iterator[Delta | Final]:
    return stream_ids(engine, tokenizer, tokenizer.encode(prompt), params, adapter=adapter)


def stream_chat(
    engine: Engine, tokenizer: Tokenizer, messages: list[dict[str, str]], params: SamplingParams, *, adapter: str | None = None
) -> Iterator[Delta | Final]:
    return stream_ids(engine, tokenizer, tokenizer.encode_chat(messages), params, adapter=adapter)


def complete(
    engine: Engine, tokenizer: Tokenizer, prompt: str | list[dict[str, str]], params: SamplingParams, *, adapter: str | None = None
) -> Final:
    """The whole reply at once (a str prompt is plain text; a list is chat messages)."""
    if isinstance(prompt, str):
        it = stream_text(engine, tokenizer, prompt, params, adapter=adapter)
    else:
        it = stream_chat(engine, tokenizer, prompt, params, adapter=adapter)
    final = None
    for ev in it:
        if isinstance(ev, Final):
            final = ev
    return final
