"""IFEval suite: generate replies to the 541 prompts of `ifeval/input_data.jsonl`, then score them strictly and loosely.

Scoring is pippin.eval.ifeval (all 25 checkers, as IFEval's released checker scores the GPT-4 responses). Each prompt is sent as
one user message with no system prompt; lm-evaluation-harness allows up to 1280 new tokens, we default to 1024.
Malformed rows and failed generations are errors, left out of every accuracy.
"""

from __future__ import annotations

from pathlib import Path

from pippin.eval.ifeval import IFEvalItem, score
from pippin.eval.runner import Request
from pippin.eval.suite import EvalContext, ItemError, SuiteResult, generation_errors, parse_rows, read_records
from pippin.eval.systems import sampling_dict

MAX_NEW_TOKENS = 1024


def _item(where: str, row: object) -> IFEvalItem:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    return IFEvalItem(key=row["key"], prompt=row["prompt"], instruction_id_list=row["instruction_id_list"], kwargs=row["kwargs"])


def load_items(path: Path, *, limit: int | None = None) -> tuple[list[IFEvalItem], list[ItemError]]:
    return parse_rows(read_records(path), _item, limit=limit)


def run(ctx: EvalContext) -> SuiteResult:
    path = ctx.path("ifeval", "input_data.jsonl")
    items, errors = load_items(path, limit=ctx.limit)
    params = ctx.sampling(max_new_tokens=MAX_NEW_TOKENS)
    requests = [Request(id=f"key {it.key}", messages=[{"role": "user", "content": it.prompt}]) for it in items]
    metrics, records = {}, []
    for system in ctx.systems:
        outs = ctx.generate(system, requests, params, desc="ifeval")
        answered = [(it, o) for it, o in zip(items, outs) if o.ok]
        errors += generation_errors(system, outs)
        result = score([it for it, _ in answered], {it.prompt: o.text for it, o in answered})
        metrics[system.spec] = {
            "prompt strict %": result.prompt_strict if result.n_prompts else None,
            "instruction strict %": result.instruction_strict if result.n_prompts else None,
            "prompt loose %": result.prompt_loose if result.n_prompts else None,
            "instruction loose %": result.instruction_loose if result.n_prompts else None,
            "n prompts": result.n_prompts,
            "n instructions": result.n_instructions,
        }
        for (it, o), r in zip(answered, result.results):
            records.append(
                {
                    "system": system.spec,
                    "key": it.key,
                    "instructions": it.instruction_id_list,
                    "response": o.text,
                    "strict": r.strict,
                    "loose": r.loose,
                }
            )
    return SuiteResult(
        suite="ifeval",
        metrics=metrics,
        headline=["prompt strict %", "instruction strict %", "prompt loose %", "instruction loose %"],
        settings={**ctx.describe(), "data": [str(path)], "sampling": sampling_dict(params)},
        items=records,
        errors=errors,
    )
