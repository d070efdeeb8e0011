"""Answer forms: the exact shape a judge's answer must take, for judges whose answers can be constrained.

A form is text with closed choices, e.g. `Rating: [[` then one of `1]]` ... `10]]`. A pippin judge fills it by
forced-choice decoding (pippin.engine.constrained), so even the 135M default model always returns a verdict the
suite's parser reads; an endpoint judge is asked in free text and parsed as before. The filled text is what the
parsers in pippin.eval.judges read, so both modes share one parser; a filled form also carries each option's
probability, for expected scores (G-Eval's probability-weighted score, Liu et al. 2023). The form skips the "explain first" part of
the judge prompts: the verdict comes right after the prompt. `spec` is part of the cache key, so changing a form
never serves stale judgments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pippin.eval.prompts import AFM_DIMENSIONS


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]


@dataclass(frozen=True)
class Filled:
    """A form as a judge filled it: the answer text, and each option's probability at each choice."""

    text: str
    probs: list[list[float]]


@dataclass(frozen=True)
class AnswerForm:
    name: str
    parts: tuple[str | Choice, ...]

    @property
    def spec(self) -> str:
        """The form as one string: forced text as is, choices as {a|b|c}."""
        return self.name + ":" + "".join(p if isinstance(p, str) else "{" + "|".join(p.options) + "}" for p in self.parts)

    def render(self, picks: Sequence[int]) -> str:
        """The answer text with the option `picks[i]` at the i-th choice."""
        it = iter(picks)
        return "".join(p if isinstance(p, str) else p.options[next(it)] for p in self.parts)

    @property
    def choices(self) -> list[Choice]:
        return [p for p in self.parts if isinstance(p, Choice)]


def rating_form(low: int = 1, high: int = 10) -> AnswerForm:
    """FastChat single-answer grading's `Rating: [[r]]`."""
    return AnswerForm("rating", ("Rating: [[", Choice(tuple(f"{r}]]" for r in range(low, high + 1)))))


VERDICT_FORM = AnswerForm("verdict", ("[[", Choice(("A]]", "B]]", "C]]"))))
"""FastChat pairwise: [[A]], [[B]] or [[C]] (tie)."""

SAFETY_FORM = AnswerForm("xstest-class", ("[[", Choice(("compliance]]", "refusal]]", "partial]]"))))

AFM_GRADES_FORM = AnswerForm(
    "afm-grades",
    tuple(part for dim in AFM_DIMENSIONS for part in (f"{dim}:", Choice((" good\n", " neutral\n", " poor\n")))),
)
"""The five `dimension: good|neutral|poor` lines of the AFM summary grader."""

AFM_GRADE_VALUES = (3.0, 2.0, 1.0)
"""good, neutral, poor: the values AFM_GRADES_FORM's options stand for, in option order."""


def afm_expected(probs: Sequence[Sequence[float]]) -> dict[str, float]:
    """Expected grade (1-3) per AFM dimension, and "overall" under AFM's rule (good if all good, poor if any
    poor), from AFM_GRADES_FORM's option probabilities (dimensions taken as independent for the overall grade)."""
    if len(probs) != len(AFM_DIMENSIONS) or any(len(p) != 3 for p in probs):
        raise ValueError(f"expected {len(AFM_DIMENSIONS)} choices of 3 probabilities, got {[len(p) for p in probs]}")
    out = {dim: sum(p * v for p, v in zip(ps, AFM_GRADE_VALUES)) for dim, ps in zip(AFM_DIMENSIONS, probs)}
    all_good = poor_none = 1.0
    for good, _, poor in probs:
        all_good *= good
        poor_none *= 1.0 - poor
    any_poor = 1.0 - poor_none
    out["overall"] = 3.0 * all_good + 1.0 * any_poor + 2.0 * max(0.0, 1.0 - all_good - any_poor)
    return out


def criteria_form(names: Sequence[str], *, low: int = 0, high: int = 10) -> AnswerForm:
    """EQ-Bench writing: `[Scores]` then `Name: score` per criterion."""
    scores = Choice(tuple(f" {s}\n" for s in range(low, high + 1)))
    return AnswerForm("criteria", ("[Scores]\n", *(part for n in names for part in (f"{n}:", scores))))
