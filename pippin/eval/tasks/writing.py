"""Writing suite: EQ-Bench creative-writing prompts, each reply scored 0-10 against the prompt's own criteria.

Follows EQ-Bench v2's creative-writing judge (EQ-bench/EQ-Bench, Paech 2023): the writing prompt is prefixed
with "You are a language model tasked with writing a creative piece for a benchmark assessment.", its <SEED>
placeholder is filled with one of its seed modifiers (`seed_index`, default the first), the judge sees the
reference output as an exemplar and scores every criterion 0-10; criteria in a group marked "lower = better"
are inverted (10 - score). A piece's score is the mean over its criteria (at least 80% must parse); the suite
score is the mean over pieces (EQ-Bench shows it x10). Generation is sampled at 0.7 with a fixed seed.
`--limit N` takes the first N prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pippin.eval.forms import criteria_form
from pippin.eval.judges import Criterion, parse_criteria_scores
from pippin.eval.prompts import WRITING_RUBRIC
from pippin.eval.runner import Request
from pippin.eval.suite import EvalContext, ItemError, SuiteResult, generation_errors, mean, parse_rows, read_records
from pippin.eval.systems import sampling_dict

MAX_NEW_TOKENS = 1024
TEMPERATURE = 0.7
PREAMBLE = "You are a language model tasked with writing a creative piece for a benchmark assessment.\n\n"


@dataclass(frozen=True, kw_only=True)
class WritingItem:
    id: str
    prompt: str
    reference: str
    criteria: list[Criterion]


def criteria_of(groups: object) -> list[Criterion]:
    """Flatten EQ-Bench's `judging_criteria` groups; the name is the text before the first ':'."""
    if not isinstance(groups, list) or not groups:
        raise ValueError("judging_criteria must be a non-empty list of groups")
    out: dict[str, Criterion] = {}
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("criteria"), list):
            raise ValueError("each judging_criteria group needs a 'criteria' list")
        lower = "lower = better" in str(g.get("prefix_text", ""))
        for text in g["criteria"]:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("a criterion must be a non-empty string")
            name, _, description = text.partition(":")
            out.setdefault(name.strip(), Criterion(name=name.strip(), description=description.strip(), lower_is_better=lower))
    return list(out.values())


def _parser(seed_index: int):  # noqa: ANN202 - parse_rows callback
    def parse(where: str, row: object) -> WritingItem:
        if not isinstance(row, dict):
            raise ValueError(f"a row must be an object, got {type(row).__name__}")
        prompt, seeds, reference = row["writing_prompt"], row["seed_modifiers"], row["reference_output"]
        if not isinstance(prompt, str) or "<SEED>" not in prompt:
            raise ValueError("writing_prompt must be a string with a <SEED> placeholder")
        if not isinstance(seeds, list) or len(seeds) <= seed_index or not isinstance(seeds[seed_index], str):
            raise ValueError(f"seed_modifiers has no string at index {seed_index}")
        if not isinstance(reference, str):
            raise ValueError("reference_output must be a string")
        key = where.split("[")[-1].rstrip("]")
        text = PREAMBLE + prompt.replace("<SEED>", seeds[seed_index])
        return WritingItem(
            id=f"prompt {key} seed {seed_index}", prompt=text, reference=reference, criteria=criteria_of(row["judging_criteria"])
        )

    return parse


def run(ctx: EvalContext, *, seed_index: int = 0) -> SuiteResult:
    ctx.require_judge("writing")
    path = ctx.path("eq_bench_creative_writing", "creative_writing_prompts.json")
    items, errors = parse_rows(read_records(path), _parser(seed_index), limit=ctx.limit)
    params = ctx.sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)
    requests = [Request(id=it.id, messages=[{"role": "user", "content": it.prompt}]) for it in items]
    metrics, records = {}, []
    for system in ctx.systems:
        outs = ctx.generate(system, requests, params, desc="writing")
        errors += generation_errors(system, outs)
        done = [(it, o.text) for it, o in zip(items, outs) if o.ok]
        judge_requests = [
            Request(
                id=it.id,
                messages=WRITING_RUBRIC.render(
                    prompt=it.prompt, reference=it.reference, response=text, criteria="\n".join(c.line for c in it.criteria)
                ),
            )
            for it, text in done
        ]
        parsers = [lambda t, c=it.criteria: parse_criteria_scores(t, c) for it, _ in done]  # each item has its own criteria
        forms = [criteria_form([c.name for c in it.criteria]) for it, _ in done]
        judgments = ctx.judge_all(judge_requests, parsers, forms=forms, desc="writing judge")
        scores = []
        for (it, text), j in zip(done, judgments):
            piece = mean(list(j.value.values())) if j.ok else None
            if j.ok:
                scores.append(piece)
            else:
                errors.append(ItemError(stage="judge", item=j.id, system=system.spec, message=j.error))
            records.append(
                {"system": system.spec, "id": it.id, "response": text, "score": piece, "criteria_scores": j.value, "judge_raw": j.raw}
            )
        metrics[system.spec] = {"score": mean(scores), "n scored": len(scores)}
    return SuiteResult(
        suite="writing",
        metrics=metrics,
        headline=["score"],
        settings={
            **ctx.describe(),
            "data": [str(path)],
            "sampling": sampling_dict(params),
            "seed_index": seed_index,
            "templates": [WRITING_RUBRIC.describe()],
        },
        items=records,
        errors=errors,
    )
