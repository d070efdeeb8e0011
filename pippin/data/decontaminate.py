"""N-gram decontamination: does a text share a run of n words with a benchmark's texts?

Texts are compared as lower-cased runs of word characters (`\\w+`, as IFEval counts words), so punctuation, case and
spacing do not hide a copy. n = 13 follows GPT-3's contamination study (Brown et al. 2020, appendix C); exact
13-gram matching finds copied sentences, not paraphrases. A reference text shorter than n words can be indexed whole
when it has at least `min_n` words (GPT-3 shortens n for short examples too; AFM collides on 4- to 13-grams), so a
12-word MT-Bench turn is still caught. Used to keep generated training prompts (`pippin.data.ifprompts`) off IFEval's
test set, and by the pretraining pipeline (`pippin.data.decontamination_steps`) against every evaluation set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

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
    """The n-grams of a set of reference texts (e.g. a benchmark's prompts), to test other texts against. With
    `min_n`, a reference text of min_n..n-1 words is indexed whole; `source` names the benchmark each n-gram came from
    (the first one added, when several share it)."""

    def __init__(self, texts: Iterable[str] = (), n: int = NGRAM, *, min_n: int | None = None, source: str = "") -> None:
        self.n, self.min_n = n, min_n or n
        self.grams: set[tuple[str, ...]] = set()
        self.sources: dict[tuple[str, ...], str] = {}
        self._prefixes: set[tuple[str, ...]] = set()  # each gram's first min_n words: one lookup per position
        self.add(texts, source=source)

    def add(self, texts: Iterable[str], *, source: str = "") -> None:
        for t in texts:
            w = words(t)
            grams = [tuple(w)] if self.min_n <= len(w) < self.n else [tuple(w[i : i + self.n]) for i in range(len(w) - self.n + 1)]
            for g in grams:
                if g not in self.grams:
                    self.grams.add(g)
                    self.sources[g] = source
                    self._prefixes.add(g[: self.min_n])

    def _hits(self, text: str) -> Iterator[tuple[str, ...]]:
        w = words(text)
        for i in range(len(w) - self.min_n + 1):
            if tuple(w[i : i + self.min_n]) in self._prefixes:
                for length in range(self.min_n, self.n + 1):
                    if (g := tuple(w[i : i + length])) in self.grams and len(g) == length:
                        yield g

    def shared(self, text: str) -> tuple[str, ...] | None:
        """The first n-gram of `text` that a reference text also has, or None when the text is clean."""
        return next(self._hits(text), None)

    def all_shared(self, text: str) -> set[tuple[str, ...]]:
        """Every n-gram of `text` that a reference text also has."""
        return set(self._hits(text))
