"""pippin's own document filters for the pretraining pipeline, as datatrove filters: language identification and
profanity / unsafe-content filtering. (Quality rules are datatrove's Gopher, C4 and FineWeb filters, used as they are.)

Language: `langdetect` (a port of Google's language-detection, already pinned for IFEval) with a fixed seed, on the
first `max_chars` characters, because datatrove's own language filter needs a fastText model download. Profanity:
the share of words found in datatrove's bundled banned and soft-banned word lists (its URLFilter's; C4's LDNOOBW list
needs a download, and better-profanity's chat censor list holds "god" and "kill", which drops the Bible). Unsafe: the
URL (when a crawled row has one) holds a word of the hard banned list (URLFilter's rule; its domain lists need
`tldextract` and a network fetch). Not a classifier: no model-based toxicity scoring.
"""

from __future__ import annotations

import re
from importlib import resources

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from langdetect import DetectorFactory, LangDetectException, detect_langs

_WORD = re.compile(r"[a-z0-9@$*!]+(?:'[a-z]+)?")
_URL_WORD = re.compile(r"[a-z0-9]+")


class LanguageFilter(BaseFilter):
    """Keeps documents whose language (langdetect, seeded) is in `languages` with probability >= `min_score`;
    records the language and score in the metadata."""

    name = "🌍 Language ID"

    def __init__(self, languages: tuple[str, ...] = ("en",), min_score: float = 0.65, max_chars: int = 2000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.min_score, self.max_chars = tuple(languages), min_score, max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        DetectorFactory.seed = 0  # langdetect samples n-grams at random; a fixed seed makes it deterministic
        try:
            best = detect_langs(doc.text[: self.max_chars])[0]
        except LangDetectException:  # no letters at all
            return False, "no_language"
        doc.metadata["language"], doc.metadata["language_score"] = best.lang, round(best.prob, 4)
        if best.lang not in self.languages:
            return False, f"language_{best.lang}"
        if best.prob < self.min_score:
            return False, "language_low_score"
        return True


def _datatrove_words(name: str) -> frozenset[str]:
    """A word list bundled with datatrove; entries it marks with '#' are left out, as its URLFilter leaves them."""
    lines = resources.files("datatrove").joinpath("assets", name).read_text().splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))


class SafetyFilter(BaseFilter):
    """Drops documents whose share of profane words exceeds `max_profanity_ratio` (reason `profanity`), or whose URL
    has a banned word (reason `unsafe_url`)."""

    name = "🚫 Profanity / unsafe"

    def __init__(self, max_profanity_ratio: float = 0.01, min_profane_words: int = 3, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_profanity_ratio, self.min_profane_words = max_profanity_ratio, min_profane_words
        self.banned_url_words = _datatrove_words("banned_words.txt")
        self.profane = self.banned_url_words | _datatrove_words("soft_banned_words.txt")

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = str(doc.metadata.get("url") or "").lower()
        if url and any(w in self.banned_url_words for w in _URL_WORD.findall(url)):
            return False, "unsafe_url"
        words = _WORD.findall(doc.text.lower())
        n_bad = sum(w in self.profane for w in words)
        if words and n_bad >= self.min_profane_words and n_bad / len(words) > self.max_profanity_ratio:
            return False, "profanity"
        return True
