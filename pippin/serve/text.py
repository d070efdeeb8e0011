"""Token ids to streamed text for one sample: incremental detokenization and stop strings.

Each new token decodes only a short window of ids (vLLM's prefix/read offsets), so a long reply costs
O(n), not O(n^2). Text that ends in an unfinished UTF-8 sequence, or that could be the start of a stop
string, is held back until the next token settles it (as pippin.engine.stream does for one request).
When a stop string appears the text is cut right before it and `stopped` is set.
"""

from __future__ import annotations

from pippin.engine.stream import held_back
from pippin.model.tokenizer import Tokenizer


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
