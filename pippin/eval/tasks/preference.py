"""Preference suite: side-by-side win/tie/loss of each --system against --against, judged in both orders.

Items are MT-Bench's questions (each turn judged on its own, FastChat's pairwise protocol: turn 2 with the whole
conversation, math/reasoning/coding against GPT-4's reference) and AlpacaEval's 805 instructions (FastChat's
"pair-v2" prompt). Every pair is judged twice, once with the system as assistant A and once as B; agreeing
verdicts stand and disagreeing ones count as a tie (FastChat's "inconsistent"), which cancels position bias. The
inconsistency rate is reported too. Percentages are of the pairs with both verdicts; `win rate %` counts a tie as
half a win. `--limit N` takes N items of each data set. Numbers with a local judge are internal comparisons only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.eval.forms import VERDICT_FORM
from pippin.eval.judges import Preference, pairwise_outcome, parse_verdict
from pippin.eval.runner import Request
from pippin.eval.suite import EvalContext, ItemError, SuiteResult, generation_errors, parse_rows, percent, read_records, require_str
from pippin.eval.systems import Message, System, sampling_dict
from pippin.eval.tasks.mtbench import MAX_NEW_TOKENS, MTBench, Question, answer_mtbench, load_mtbench, needs_reference


@dataclass(frozen=True, kw_only=True)
class Instruction:
    id: str
    text: str


def _alpaca(where: str, row: object) -> Instruction:
    (text,) = require_str(row, "instruction")
    return Instruction(id=f"alpaca_eval/{where.split('[')[-1].rstrip(']')}", text=text)


def pair_messages(bench: MTBench, q: Question, turn: int, a: list[str], b: list[str]) -> list[Message]:
    """FastChat's pairwise judge prompt for one MT-Bench turn, `a` as assistant A and `b` as assistant B."""
    ref = needs_reference(q)
    if turn == 1:
        prompt = bench.judge_prompts["pair-math-v1" if ref else "pair-v2"]
        fields = {"question": q.turns[0], "answer_a": a[0], "answer_b": b[0]}
    else:
        prompt = bench.judge_prompts["pair-math-v1-multi-turn" if ref else "pair-v2-multi-turn"]
        fields = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_a_1": a[0], "answer_a_2": a[1]}
        fields |= {"answer_b_1": b[0], "answer_b_2": b[1]}
    if ref:
        fields |= {"ref_answer_1": q.reference[0], "ref_answer_2": q.reference[-1]}
    return prompt.render(**fields)


def tally(outcomes: list[tuple[Preference, bool]]) -> dict[str, float | None]:
    """win/tie/loss/inconsistent percentages and the win rate with ties as half, from pairwise outcomes."""
    n = len(outcomes)
    counts = Counter(o for o, _ in outcomes)
    return {
        "win %": percent(counts[Preference.WIN], n),
        "tie %": percent(counts[Preference.TIE], n),
        "loss %": percent(counts[Preference.LOSS], n),
        "inconsistent %": percent(sum(not c for _, c in outcomes), n),
        "win rate %": percent(counts[Preference.WIN] + 0.5 * counts[Preference.TIE], n),
        "n pairs": n,
    }


def _answers(
    ctx: EvalContext, system: System, bench: MTBench, instructions: list[Instruction], params: SamplingParams
) -> tuple[dict[int, list[str]], dict[str, str], list[ItemError], dict]:
    """The system's MT-Bench answers (both turns), its AlpacaEval answers, the errors, MT-Bench's sampling settings."""
    mt, errors, settings = answer_mtbench(ctx, system, bench.questions, desc="preference mt-bench")
    outs = ctx.generate(
        system, [Request(id=i.id, messages=[{"role": "user", "content": i.text}]) for i in instructions], params, desc="preference alpaca"
    )
    errors += generation_errors(system, outs)
    return mt, {o.id: o.text for o in outs if o.ok}, errors, settings


def run(ctx: EvalContext) -> SuiteResult:
    ctx.require_judge("preference")
    if ctx.against is None:
        raise PippinError("The preference suite compares two systems; pass --against SPEC as well as --system SPEC.")
    bench = load_mtbench(ctx)
    apath = ctx.path("alpaca_eval", "gpt4_1106_preview_model_outputs.json")
    instructions, bad = parse_rows(read_records(apath), _alpaca, limit=ctx.limit)
    errors = [*bench.errors, *bad]
    params = ctx.sampling(max_new_tokens=MAX_NEW_TOKENS)
    base_mt, base_alpaca, base_errors, base_settings = _answers(ctx, ctx.against, bench, instructions, params)
    errors += base_errors
    metrics, records, sampling = {}, [], {ctx.against.spec: {"mt-bench": base_settings, "alpaca_eval": sampling_dict(params)}}
    for system in ctx.systems:
        mt, alpaca, sys_errors, settings = _answers(ctx, system, bench, instructions, params)
        errors += sys_errors
        sampling[system.spec] = {"mt-bench": settings, "alpaca_eval": sampling_dict(params)}
        pairs: list[tuple[str, str, list[Message], list[Message]]] = []  # (item, dataset, system as A, system as B)
        for q in bench.questions:
            if q.id in mt and q.id in base_mt:
                for turn in (1, 2):
                    ab = pair_messages(bench, q, turn, mt[q.id], base_mt[q.id])
                    ba = pair_messages(bench, q, turn, base_mt[q.id], mt[q.id])
                    pairs.append((f"mt_bench/q{q.id} turn {turn}", "mt-bench", ab, ba))
        for ins in instructions:
            if ins.id in alpaca and ins.id in base_alpaca:
                ab = bench.judge_prompts["pair-v2"].render(question=ins.text, answer_a=alpaca[ins.id], answer_b=base_alpaca[ins.id])
                ba = bench.judge_prompts["pair-v2"].render(question=ins.text, answer_a=base_alpaca[ins.id], answer_b=alpaca[ins.id])
                pairs.append((ins.id, "alpaca_eval", ab, ba))
        requests = [
            Request(id=f"{item} | {order}", messages=m) for item, _, ab, ba in pairs for order, m in (("system=A", ab), ("system=B", ba))
        ]
        verdicts = ctx.judge_all(requests, parse_verdict, forms=VERDICT_FORM, desc="preference judge")
        outcomes: dict[str, list[tuple[Preference, bool]]] = {"all": [], "mt-bench": [], "alpaca_eval": []}
        for k, (item, dataset, _, _) in enumerate(pairs):
            first, second = verdicts[2 * k], verdicts[2 * k + 1]
            failed = [j for j in (first, second) if not j.ok]
            for j in failed:
                errors.append(ItemError(stage="judge", item=j.id, system=system.spec, message=j.error))
            result = None if failed else pairwise_outcome(first.value, second.value)
            if result is not None:
                outcomes["all"].append(result)
                outcomes[dataset].append(result)
            records.append(
                {
                    "system": system.spec,
                    "against": ctx.against.spec,
                    "item": item,
                    "verdicts": [first.value, second.value],
                    "outcome": result[0].value if result else None,
                    "consistent": result[1] if result else None,
                }
            )
        row = tally(outcomes["all"])
        for dataset in ("mt-bench", "alpaca_eval"):
            row |= {f"{dataset} {k}": v for k, v in tally(outcomes[dataset]).items() if k in ("win %", "tie %", "loss %", "n pairs")}
        metrics[f"{system.spec} vs {ctx.against.spec}"] = row
    return SuiteResult(
        suite="preference",
        metrics=metrics,
        headline=["win %", "tie %", "loss %"],
        settings={**ctx.describe(), "data": [*bench.paths, str(apath)], "sampling": sampling, "judge_prompts": bench.describe_prompts()},
        items=records,
        errors=errors,
    )
