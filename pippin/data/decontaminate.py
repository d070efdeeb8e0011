"""N-gram decontamination: does a text share a run of n words with a benchmark's prompts?

Texts are compared as lower-cased runs of word characters (`\\w+`, as IFEval counts words), so punctuation, case and
spacing do not hide a copy. n = 13 follows GPT-3's contamination study (Brown et al. 2020, appendix C); exact
13-gram matching finds copied sentences, not paraphrases. Used to keep generated training prompts
(`pippin.data.ifprompts`) off IFEval's test set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NGRAM = 13
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Every run of n consecutive word tokens of `text` (none when it has fewer than n)."""
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


class NGramIndex:
    """The n-grams of a set of reference texts (e.g. a benchmark's prompts), to test other texts against."""

    def __init__(self, texts: Iterable[str], n: int = NGRAM) -> None:
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        for t in texts:
            self.grams |= ngrams(t, n)

    def shared(self, text: str) -> tuple[str, ...] | None:
        """The first n-gram of `text` that a reference text also has, or None when the text is clean."""
        w = words(text)
        return next((g for i in range(len(w) - self.n + 1) if (g := tuple(w[i : i + self.n])) in self.grams), None)
