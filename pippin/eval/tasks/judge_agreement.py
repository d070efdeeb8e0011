"""Judge-agreement suite: how well the AFM summary grader agrees with people, on DialSummEval.

DialSummEval (Gao & Wan, NAACL 2022) has 1,400 SAMSum summaries rated 1-5 by 3 annotators for consistency,
relevance, fluency and coherence. Each (dialogue, summary) is graded with the summarization suite's judge prompt;
the judge's good/neutral/poor becomes 3/2/1 and is compared with the annotators' mean on the matching dimension:
consistency ~ groundedness, relevance ~ comprehensiveness, fluency and coherence ~ composition (AFM has no
separate fluency/coherence; instruction following and harmfulness have no human counterpart). Reported per
dimension: Spearman's rho (`scipy.stats.spearmanr`, ties averaged) and exact agreement with the mean rating bucketed as SOURCE.md
suggests (below 2.5 poor, below 3.5 neutral, else good); plus rho of the AFM overall grade against the mean of
all four human dimensions. A pippin judge answers in the grading form by forced choice, and its rho is taken on
its expected grade (the option probabilities weighted 3/2/1, G-Eval's probability-weighted score), which ranks
summaries even when its top grade is the same for all. The judge is --judge, and every --system is rated as a judge too (one row each), so
one report can compare the default model with a stronger judge. `--limit N` takes the first N summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from scipy.stats import spearmanr

from pippin.eval.forms import afm_expected
from pippin.eval.judges import Grade, afm_overall
from pippin.eval.prompts import SUMMARIZE_DIALOGUE, SUMMARY_GRADER
from pippin.eval.suite import EvalContext, ItemError, SuiteResult, parse_rows, percent, read_records, require_str
from pippin.eval.tasks.summarization import grade_summaries

HUMAN_TO_JUDGE = {"consistency": "groundedness", "relevance": "comprehensiveness", "fluency": "composition", "coherence": "composition"}
GRADE_VALUE = {Grade.POOR: 1, Grade.NEUTRAL: 2, Grade.GOOD: 3}
INSTRUCTION = SUMMARIZE_DIALOGUE.user.split("\n\n{text}")[0]


@dataclass(frozen=True, kw_only=True)
class RatedSummary:
    id: str
    dialogue: str
    summary: str
    human: dict[str, float]
    """Mean annotator score (1-5) per DialSummEval dimension."""


def _row(where: str, row: object) -> RatedSummary:
    dialogue, summary = require_str(row, "dialogue", "summary")
    notes = row["annotations"]
    if not isinstance(notes, list) or not notes:
        raise ValueError("annotations must be a non-empty list")
    human = {}
    for dim in HUMAN_TO_JUDGE:
        scores = [a.get(dim) if isinstance(a, dict) else None for a in notes]
        if not all(isinstance(s, int | float) and not isinstance(s, bool) and 1 <= s <= 5 for s in scores):
            raise ValueError(f"every annotation needs a 1-5 {dim!r} score")
        human[dim] = sum(scores) / len(scores)
    # turns are separated by '|' in DialSummEval; show them one per line like DialogSum
    turns = [t.strip() for t in dialogue.split("|") if t.strip()]
    return RatedSummary(id=f"{row.get('id')}/{row.get('model_id')}@{where}", dialogue="\n".join(turns), summary=summary, human=human)


def bucket(mean_score: float) -> Grade:
    return Grade.POOR if mean_score < 2.5 else Grade.NEUTRAL if mean_score < 3.5 else Grade.GOOD


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho of paired ratings; None where it is undefined (a constant side, which includes fewer than 2 pairs)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None  # scipy would warn and return NaN
    return float(spearmanr(x, y).statistic)


def agreement(
    pairs: list[tuple[RatedSummary, dict[str, Grade]]], expected: list[dict[str, float]] | None = None
) -> dict[str, float | None]:
    """Spearman rho and exact agreement per human dimension, and rho of the overall grade, from (item, grades).

    expected: per item, the judge's expected grade per dimension and "overall" (from its option probabilities);
    when given, rho is taken on it instead of on the 3-level grade, which a small judge often leaves constant.
    Exact agreement always uses the grade the judge gave."""
    out: dict[str, float | None] = {}
    for dim, judge_dim in HUMAN_TO_JUDGE.items():
        human = [it.human[dim] for it, _ in pairs]
        judge = [e[judge_dim] for e in expected] if expected is not None else [GRADE_VALUE[g[judge_dim]] for _, g in pairs]
        out[f"spearman {dim}~{judge_dim}"] = spearman_rho(human, judge)
        out[f"agreement {dim} %"] = percent(sum(bucket(h) is g[judge_dim] for h, (_, g) in zip(human, pairs)), len(pairs))
    human = [sum(it.human.values()) / len(it.human) for it, _ in pairs]
    overall = [e["overall"] for e in expected] if expected is not None else [GRADE_VALUE[afm_overall(g)] for _, g in pairs]
    out["spearman overall"] = spearman_rho(human, overall)
    out["n graded"] = len(pairs)
    return out


def run(ctx: EvalContext) -> SuiteResult:
    judges = [*([ctx.judge] if ctx.judge else []), *(s for s in ctx.systems if not ctx.judge or s.spec != ctx.judge.spec)]
    if not judges:
        ctx.require_judge("judge-agreement")
    path = ctx.path("dialsummeval", "human_judgment.jsonl")
    items, errors = parse_rows(read_records(path), _row, limit=ctx.limit)
    metrics, records, rho_on = {}, [], {}
    for judge in judges:
        judgments = grade_summaries(
            replace(ctx, judge=judge), [(it.id, INSTRUCTION, it.dialogue, it.summary) for it in items], desc="judge-agreement"
        )
        pairs, expected = [], []
        for it, j in zip(items, judgments):
            if j.ok:
                pairs.append((it, j.value))
                expected.append(afm_expected(j.probs) if j.probs is not None else None)
            else:
                errors.append(ItemError(stage="judge", item=it.id, system=judge.spec, message=j.error))
            grades = {d: g.value for d, g in j.value.items()} if j.ok else None
            records.append({"judge": judge.spec, "id": it.id, "human": it.human, "grades": grades, "judge_raw": j.raw, "probs": j.probs})
        weighted = bool(expected) and all(e is not None for e in expected)
        metrics[judge.spec] = agreement(pairs, expected if weighted else None)
        rho_on[judge.spec] = "expected grade (option probabilities)" if weighted else "grade"
    return SuiteResult(
        suite="judge-agreement",
        metrics=metrics,
        headline=[f"spearman {d}~{j}" for d, j in HUMAN_TO_JUDGE.items()] + ["spearman overall"],
        settings={
            **ctx.describe(),
            "judges": [j.spec for j in judges],
            "spearman_on": rho_on,
            "data": [str(path)],
            "templates": [SUMMARY_GRADER.describe()],
        },
        items=records,
        errors=errors,
    )
