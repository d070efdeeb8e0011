"""Summarization suite: DialogSum dialogues and XSum news articles, graded the AFM way and with ROUGE.

AFM (arXiv:2407.21075 §6): a judge rates composition, comprehensiveness, groundedness, following instructions
and harmfulness as good/neutral/poor; a summary is good if all five are good, poor if any is poor. ROUGE-1/2/L F1
(x100) is Google's `rouge-score` with its Porter stemmer, what DialogSum/XSum papers report, against the best of
DialogSum's three references (its `score_multi`: max per variant) and XSum's one. `--limit N` takes the first N
rows of each data set. Without --judge only ROUGE is reported. `grade_summaries` is shared with the judge-agreement suite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from rouge_score.rouge_scorer import RougeScorer

from pippin.eval.forms import AFM_GRADES_FORM
from pippin.eval.judges import Grade, Judgment, afm_overall, parse_afm_grades
from pippin.eval.prompts import AFM_DIMENSIONS, SUMMARIZE_DIALOGUE, SUMMARIZE_NEWS, SUMMARY_GRADER, PromptTemplate
from pippin.eval.runner import Request
from pippin.eval.suite import EvalContext, ItemError, SuiteResult, generation_errors, mean, parse_rows, percent, read_records, require_str
from pippin.eval.systems import sampling_dict

MAX_NEW_TOKENS = 256
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ROUGE = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


@dataclass(frozen=True, kw_only=True)
class SummaryItem:
    id: str
    dataset: str
    source: str
    references: list[str]
    template: PromptTemplate

    @property
    def instruction(self) -> str:
        """What the summarizer was asked, without the source text (the judge sees the source separately)."""
        return self.template.user.split("\n\n{text}")[0]


def _dialogsum(where: str, row: object) -> SummaryItem:
    fname, dialogue = require_str(row, "fname", "dialogue")
    refs = [row[k] for k in ("summary1", "summary2", "summary3") if isinstance(row.get(k), str) and row[k].strip()]
    if not refs:
        raise ValueError("no reference summary (summary1..3)")
    return SummaryItem(id=f"dialogsum/{fname}", dataset="dialogsum", source=dialogue, references=refs, template=SUMMARIZE_DIALOGUE)


def _xsum(where: str, row: object) -> SummaryItem:
    doc, summary = require_str(row, "document", "summary")
    return SummaryItem(id=f"xsum/{row.get('id', where)}", dataset="xsum", source=doc, references=[summary], template=SUMMARIZE_NEWS)


def best_rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 x100 (stemmed) against the best reference for each variant."""
    best = _ROUGE.score_multi(list(references), prediction)
    return {k: 100 * best[k].fmeasure for k in ROUGE_TYPES}


def grade_summaries(ctx: EvalContext, entries: Sequence[tuple[str, str, str, str]], *, desc: str = "grade summaries") -> list[Judgment]:
    """Judge (id, instruction, source, summary) entries; a Judgment's value is {dimension: Grade}."""
    requests = [Request(id=i, messages=SUMMARY_GRADER.render(instruction=ins, source=src, summary=s)) for i, ins, src, s in entries]
    return ctx.judge_all(requests, parse_afm_grades, forms=AFM_GRADES_FORM, desc=desc)


def afm_metrics(grades: Sequence[dict[str, Grade]]) -> dict[str, float | None]:
    """good/neutral/poor percentages overall (AFM's rule) and the share of "good" per dimension."""
    overall = Counter(afm_overall(g) for g in grades)
    n = len(grades)
    out = {f"{g.value} %": percent(overall[g], n) for g in Grade}
    for dim in AFM_DIMENSIONS:
        out[f"{dim}: good %"] = percent(sum(g[dim] is Grade.GOOD for g in grades), n)
    out["n graded"] = n
    return out


def load_items(ctx: EvalContext) -> tuple[list[SummaryItem], list[ItemError], list[str]]:
    items, errors, paths = [], [], []
    for parts, parse in ((("dialogsum", "dialogsum.test.jsonl"), _dialogsum), (("xsum", "test.jsonl"), _xsum)):
        path = ctx.path(*parts)
        found, bad = parse_rows(read_records(path), parse, limit=ctx.limit)
        items += found
        errors += bad
        paths.append(str(path))
    return items, errors, paths


def run(ctx: EvalContext) -> SuiteResult:
    items, errors, paths = load_items(ctx)
    params = ctx.sampling(max_new_tokens=MAX_NEW_TOKENS)
    requests = [Request(id=it.id, messages=it.template.render(text=it.source)) for it in items]
    metrics, records = {}, []
    for system in ctx.systems:
        outs = ctx.generate(system, requests, params, desc="summarize")
        errors += generation_errors(system, outs)
        done = [(it, o.text) for it, o in zip(items, outs) if o.ok]
        rouges = {it.id: best_rouge(text, it.references) for it, text in done}
        row: dict[str, float | None] = {}
        for dataset in ("dialogsum", "xsum"):
            scores = [rouges[it.id] for it, _ in done if it.dataset == dataset]
            for variant in ROUGE_TYPES:
                row[f"{dataset} {variant}"] = mean([s[variant] for s in scores])
            row[f"{dataset} n"] = len(scores)
        judged: dict[str, Judgment] = {}
        if ctx.judge is not None:
            for j in grade_summaries(ctx, [(it.id, it.instruction, it.source, text) for it, text in done]):
                judged[j.id] = j
                if not j.ok:
                    errors.append(ItemError(stage="judge", item=j.id, system=system.spec, message=j.error))
            row.update(afm_metrics([j.value for j in judged.values() if j.ok]))
        metrics[system.spec] = row
        for it, text in done:
            j = judged.get(it.id)
            grades = {d: g.value for d, g in j.value.items()} if j is not None and j.ok else None
            records.append(
                {
                    "system": system.spec,
                    "id": it.id,
                    "summary": text,
                    "rouge": rouges[it.id],
                    "grades": grades,
                    "overall": afm_overall(j.value).value if j is not None and j.ok else None,
                    "judge_raw": j.raw if j is not None else None,
                }
            )
    return SuiteResult(
        suite="summarization",
        metrics=metrics,
        headline=(["good %", "poor %"] if ctx.judge else []) + ["dialogsum rougeL", "xsum rougeL"],
        settings={
            **ctx.describe(),
            "data": paths,
            "sampling": sampling_dict(params),
            "templates": [t.describe() for t in (SUMMARIZE_DIALOGUE, SUMMARIZE_NEWS, SUMMARY_GRADER)],
        },
        items=records,
        errors=errors,
        notes=[] if ctx.judge else ["No --judge: the AFM good/neutral/poor grading was skipped; ROUGE only."],
    )
