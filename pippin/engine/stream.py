"""The text layer over the engine: token ids in, streamed text out, with stop strings; one implementation for all.

`TextStream` turns one sample's token ids into text incrementally: each new token decodes only a short window of ids
(vLLM's prefix/read offsets, as mlx-lm's streaming detokenizer), so a reply costs O(1) per token; text that ends in an
unfinished UTF-8 sequence, or that could still grow into a stop string, is held back until the next token settles it;
at a stop string the text is cut right before it and `stopped` is set. The CLI (`stream_ids`), the server's sinks and
eval's batched replies all use it. `stream_ids` ends with a `Final` record carrying the full text and the engine's
stats (prompt tokens, TTFT, prefill and decode tok/s). The engine below only sees ids.
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


class TextStream:
    """Feed token ids with `push`; it returns the text that is safe to show now."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        """Everything decoded so far (cut at the stop string once one matched)."""
        self.emitted = 0
        """Characters of `text` already returned."""
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to text already counted
        self._read = 0

    def push(self, token: int) -> str:
        """Add one token; return the newly safe text ('' while it is held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if now.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its next byte
            return ""
        delta = now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += delta
        if self.stop:
            cut = min((i for s in self.stop if (i := self.text.find(s, start)) >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
        return self._take(len(self.text) - held_back(self.text, self.stop))

    def flush(self) -> str:
        """The held-back rest, when the sample ends without a stop string."""
        if not self.stopped and self._read < len(self.ids):  # a trailing partial character
            self.text += self.tokenizer.decode(self.ids[self._prefix :])[len(self.tokenizer.decode(self.ids[self._prefix : self._read])) :]
            self._read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return out


def stream_ids(
    engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *, adapter: str | None = None
) -> Iterator[Delta | Final]:
    """Stream the reply to one prompt given as ids (with the named LoRA adapter, if any)."""
    stop_ids = set(engine.eos_ids)
    text = TextStream(tokenizer, params.stop)
    finish = "length"
    steps = engine.generate([prompt_ids], params, adapters=[adapter])
    for step in steps:
        tok = int(step.tokens[0])
        if not params.ignore_eos and tok in stop_ids:
            finish = "stop"
            break
        if delta := text.push(tok):
            yield Delta(text=delta)
        if text.stopped:
            finish = "stop"
            break
    steps.close()  # finalises the engine's stats even when we stopped early
    if rest := text.flush():
        yield Delta(text=rest)
    stats = engine.last_stats
    if finish == "stop":
        stats.finish_reasons = ["stop"]
    yield Final(text=text.text, token_ids=text.ids, finish_reason=finish, stats=stats)


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
