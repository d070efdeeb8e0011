"""A guard against replies that game format verifiers: such a reply earns no verifier reward.

IFEval's checkers test form (a title in <<...>>, N placeholders in [...], words in capitals, a count of sections),
never content, and MDLOO on them learned exactly that: `<<Your answer>>` and a repeated `[Your Full Name]` with
nothing else, the same starred line over and over (docs/posttraining.md). A reply is degenerate when, once template
spans and markup are taken out, fewer than `min_words` words remain, or when it is mostly a loop: fewer than
`min_distinct` of its word 4-grams are distinct. The rule sees the absence of content, never its quality. On the
default model's own IFEval replies (541, 256 tokens) it flags 18 as empty and 155 as loops: the 135M model loops
that often by itself, and a reward that pays loops would teach them; after MDLOO without the guard, 24 and 184.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TEMPLATE = re.compile(r"<<[^<>]*>>|\[[^\[\]]*\]|\{[^{}]*\}")  # <<title>>, [placeholder], {slot}
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


@dataclass(frozen=True, kw_only=True)
class DegenerateGuard:
    min_words: int = 5
    """Fewer content words than this (outside template spans) is an empty answer dressed as one."""
    min_distinct: float = 0.35
    """A reply of 20+ words whose distinct word 4-grams are fewer than this share of all of them is a loop."""

    def reason(self, reply: str) -> str | None:
        """Why `reply` is degenerate ('no content', 'loop'), or None when it is not."""
        content = _WORD.findall(_TEMPLATE.sub(" ", reply))
        if len(content) < self.min_words:
            return "no content"
        words = [w.lower() for w in _WORD.findall(reply)]
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        if len(words) >= 20 and len(set(grams)) < self.min_distinct * len(grams):
            return "loop"
        return None

    def __call__(self, reward: float, reply: str) -> float:
        """The verifier's reward, or 0.0 for a degenerate reply."""
        return 0.0 if self.reason(reply) else reward
