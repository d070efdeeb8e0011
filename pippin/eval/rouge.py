"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (Lin 2004), computed the way Google's `rouge-score` does.

Tokens: lower-case, every run of characters other than a-z and 0-9 is a separator, and with `stem=True`
tokens longer than 3 characters are Porter-stemmed (`pippin.eval.porter`). ROUGE-N counts clipped n-gram
overlaps; ROUGE-L uses the longest common subsequence of the two token lists; ROUGE-Lsum treats each line as
a sentence and takes the union LCS of every reference line against all prediction lines. Each score has
precision, recall and F1. No multi-reference aggregation or bootstrap intervals: average `fmeasure` yourself.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from pippin.eval.porter import stem as porter_stem


@dataclass(frozen=True)
class RougeScore:
    """Precision, recall and F1 of one ROUGE variant, each in [0, 1]."""

    precision: float
    recall: float
    fmeasure: float

    @classmethod
    def from_counts(cls, hits: int, n_prediction: int, n_reference: int) -> RougeScore:
        precision = hits / n_prediction if n_prediction else 0.0
        recall = hits / n_reference if n_reference else 0.0
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return cls(precision=precision, recall=recall, fmeasure=f)


@dataclass(frozen=True)
class RougeResult:
    """All four variants for one prediction/reference pair."""

    rouge1: RougeScore
    rouge2: RougeScore
    rougeL: RougeScore  # the names every ROUGE report uses
    rougeLsum: RougeScore


def tokenize(text: str, *, stem: bool = False) -> list[str]:
    """rouge-score's tokens: lower-case alphanumeric runs, Porter-stemmed when longer than 3 if `stem`."""
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [porter_stem(t) if stem and len(t) > 3 else t for t in tokens]


def _ngram_score(prediction: list[str], reference: list[str], n: int) -> RougeScore:
    pred = Counter(tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1))
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    hits = sum(min(count, ref[gram]) for gram, count in pred.items())
    return RougeScore.from_counts(hits, sum(pred.values()), sum(ref.values()))


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    """table[i][j] = LCS length of a[:i] and b[:j]."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, start=1):
        row, prev = table[i], table[i - 1]
        for j, y in enumerate(b, start=1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    return table


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    return _lcs_table(a, b)[-1][-1]


def _lcs_indices(reference: list[str], prediction: list[str]) -> set[int]:
    """Indices into `reference` of one LCS (rouge-score's backtracking order, which the union depends on)."""
    table = _lcs_table(reference, prediction)
    i, j, picked = len(reference), len(prediction), set()
    while i and j:
        if reference[i - 1] == prediction[j - 1]:
            picked.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return picked


def _lsum_score(prediction_lines: list[list[str]], reference_lines: list[list[str]]) -> RougeScore:
    n_pred, n_ref = sum(map(len, prediction_lines)), sum(map(len, reference_lines))
    if not n_pred or not n_ref:
        return RougeScore(0.0, 0.0, 0.0)
    pred_left = Counter(t for line in prediction_lines for t in line)
    ref_left = Counter(t for line in reference_lines for t in line)
    hits = 0
    for ref in reference_lines:
        union = set().union(*(_lcs_indices(ref, pred) for pred in prediction_lines))
        for token in (ref[i] for i in sorted(union)):
            # A token is credited at most as often as it occurs on both sides.
            if pred_left[token] > 0 and ref_left[token] > 0:
                hits += 1
                pred_left[token] -= 1
                ref_left[token] -= 1
    return RougeScore.from_counts(hits, n_pred, n_ref)


def rouge(prediction: str, reference: str, *, stem: bool = False) -> RougeResult:
    """ROUGE-1/2/L/Lsum of `prediction` against one `reference`."""
    pred, ref = tokenize(prediction, stem=stem), tokenize(reference, stem=stem)
    lines = [[t for t in (tokenize(line, stem=stem) for line in text.split("\n")) if t] for text in (prediction, reference)]
    return RougeResult(
        rouge1=_ngram_score(pred, ref, 1),
        rouge2=_ngram_score(pred, ref, 2),
        rougeL=RougeScore.from_counts(lcs_length(pred, ref), len(pred), len(ref)),
        rougeLsum=_lsum_score(*lines),
    )
