"""MT-Bench suite: 80 two-turn questions answered by each system, graded 1-10 per turn by a judge (FastChat).

Follows FastChat's llm_judge (lm-sys/FastChat@0e6d3e4b, Zheng et al. 2023): turn 2 is asked with the system's own
turn-1 answer in the history; generation temperature is 0.7 for writing and roleplay, 0.1 for stem and
humanities, 0 otherwise (unless --temperature is given); math, reasoning and coding are graded against GPT-4's
reference answers with the "-math" prompts; the judge prompts are FastChat's, read from
`mt_bench/judge_prompts.jsonl`, with the system prompt as a system message. The score is the mean rating over
every graded turn. A pippin judge answers in the `Rating: [[r]]` form by forced choice, and its expected rating
(each rating weighted by its probability) is reported as "expected score" too. `load_mtbench` and
`answer_mtbench` are shared with the preference suite.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from pippin.errors import PippinError
from pippin.eval.forms import rating_form
from pippin.eval.judges import parse_rating
from pippin.eval.runner import Request
from pippin.eval.suite import EvalContext, ItemError, SuiteResult, generation_errors, mean, parse_rows, read_records
from pippin.eval.systems import Message, System, sampling_dict

MAX_NEW_TOKENS = 1024
RATINGS = range(1, 11)
"""FastChat's single-answer scale."""
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}
NEED_REF_CATS = ("math", "reasoning", "coding")
JUDGE_PROMPTS = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
JUDGE_PROMPTS += ("pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn")
"""FastChat's judge prompt names that the MT-Bench and preference suites use."""


@dataclass(frozen=True, kw_only=True)
class Question:
    id: int
    category: str
    turns: list[str]
    reference: list[str] | None = None
    """GPT-4's answers to both turns, for the categories graded against a reference."""


@dataclass(frozen=True, kw_only=True)
class JudgePrompt:
    name: str
    system: str
    template: str

    def render(self, **fields: str) -> list[Message]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.template.format(**fields)}]


@dataclass(kw_only=True)
class MTBench:
    questions: list[Question]
    judge_prompts: dict[str, JudgePrompt]
    errors: list[ItemError]
    paths: list[str]

    def describe_prompts(self) -> list[dict]:
        return [
            {"id": p.name, "sha": hashlib.sha256((p.system + p.template).encode()).hexdigest()[:12]} for p in self.judge_prompts.values()
        ]


def _question(where: str, row: object) -> Question:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    qid, category, turns = row["question_id"], row["category"], row["turns"]
    if not isinstance(qid, int) or not isinstance(category, str):
        raise ValueError("question_id must be an integer and category a string")
    if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError("turns must be a list of two non-empty strings")
    return Question(id=qid, category=category, turns=turns)


def load_mtbench(ctx: EvalContext) -> MTBench:
    """Questions (first `ctx.limit`), GPT-4 references for math/reasoning/coding, and the judge prompts."""
    qpath = ctx.path("mt_bench", "question.jsonl")
    questions, errors = parse_rows(read_records(qpath), _question, limit=ctx.limit)
    paths = [str(qpath)]
    refs: dict[int, list[str]] = {}
    rpath = ctx.data_dir / "mt_bench" / "reference_answer" / "gpt-4.jsonl"
    if rpath.is_file():
        paths.append(str(rpath))
        for where, row in read_records(rpath):
            try:
                refs[row["question_id"]] = [str(t) for t in row["choices"][0]["turns"]][:2]
            except (KeyError, IndexError, TypeError):
                errors.append(ItemError(stage="data", item=where, message="malformed reference answer row"))
    questions = [Question(id=q.id, category=q.category, turns=q.turns, reference=refs.get(q.id)) for q in questions]
    ppath = ctx.path("mt_bench", "judge_prompts.jsonl")
    paths.append(str(ppath))
    prompts = {}
    for where, row in read_records(ppath):
        try:
            prompts[row["name"]] = JudgePrompt(name=row["name"], system=row["system_prompt"], template=row["prompt_template"])
        except (KeyError, TypeError):
            errors.append(ItemError(stage="data", item=where, message="malformed judge prompt row"))
    if missing := [n for n in JUDGE_PROMPTS if n not in prompts]:
        raise PippinError(f"{ppath} lacks the judge prompt(s) {', '.join(missing)}; use FastChat's judge_prompts.jsonl.")
    return MTBench(questions=questions, judge_prompts=prompts, errors=errors, paths=paths)


def needs_reference(q: Question) -> bool:
    return q.category in NEED_REF_CATS and q.reference is not None


def answer_mtbench(
    ctx: EvalContext, system: System, questions: list[Question], *, desc: str = "mt-bench"
) -> tuple[dict[int, list[str]], list[ItemError], dict]:
    """Both turns for each question: {question id: [answer 1, answer 2]} for the fully answered ones, the errors,
    and the sampling settings used per temperature."""
    base = ctx.sampling(max_new_tokens=MAX_NEW_TOKENS)
    by_temp: dict[float, list[Question]] = defaultdict(list)
    for q in questions:
        by_temp[base.temperature if ctx.temperature is not None else CATEGORY_TEMPERATURE.get(q.category, 0.0)].append(q)
    answers: dict[int, list[str]] = {}
    errors, settings = [], {}
    for temperature, group in by_temp.items():
        params = ctx.sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature)
        settings[str(temperature)] = sampling_dict(params)
        first = ctx.generate(
            system, [Request(id=f"q{q.id} turn 1", messages=[{"role": "user", "content": q.turns[0]}]) for q in group], params, desc=desc
        )
        ok = [(q, o.text) for q, o in zip(group, first) if o.ok]
        errors += generation_errors(system, first)
        history = [
            [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a1}, {"role": "user", "content": q.turns[1]}]
            for q, a1 in ok
        ]
        second = ctx.generate(system, [Request(id=f"q{q.id} turn 2", messages=h) for (q, _), h in zip(ok, history)], params, desc=desc)
        for (q, a1), o in zip(ok, second):
            if o.ok:
                answers[q.id] = [a1, o.text]
            else:
                errors += generation_errors(system, [o])
    return answers, errors, settings


def single_grading_request(bench: MTBench, q: Question, answers: list[str], turn: int) -> Request:
    """FastChat's single-answer judge prompt for one turn (1 or 2) of one answered question."""
    ref = needs_reference(q)
    if turn == 1:
        prompt = bench.judge_prompts["single-math-v1" if ref else "single-v1"]
        fields = {"question": q.turns[0], "answer": answers[0]}
    else:
        prompt = bench.judge_prompts["single-math-v1-multi-turn" if ref else "single-v1-multi-turn"]
        fields = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": answers[0], "answer_2": answers[1]}
    if ref:
        fields |= {"ref_answer_1": q.reference[0], "ref_answer_2": q.reference[-1]}
    return Request(id=f"q{q.id} turn {turn}", messages=prompt.render(**fields))


def run(ctx: EvalContext) -> SuiteResult:
    ctx.require_judge("mtbench")
    bench = load_mtbench(ctx)
    errors = list(bench.errors)
    metrics, records, sampling = {}, [], {}
    for system in ctx.systems:
        answers, gen_errors, sampling[system.spec] = answer_mtbench(ctx, system, bench.questions)
        errors += gen_errors
        answered = [q for q in bench.questions if q.id in answers]
        requests = [single_grading_request(bench, q, answers[q.id], turn) for q in answered for turn in (1, 2)]
        judgments = ctx.judge_all(requests, parse_rating, forms=rating_form(RATINGS[0], RATINGS[-1]), desc="mt-bench judge")
        ratings: dict[str, list[float]] = defaultdict(list)
        for (q, turn), j in zip(((q, t) for q in answered for t in (1, 2)), judgments):
            records.append(
                {
                    "system": system.spec,
                    "question_id": q.id,
                    "category": q.category,
                    "turn": turn,
                    "answer": answers[q.id][turn - 1],
                    "rating": j.value,
                    "judge_raw": j.raw,
                    "rating_probs": j.probs[0] if j.probs else None,
                }
            )
            if not j.ok:
                errors.append(ItemError(stage="judge", item=j.id, system=system.spec, message=j.error))
                continue
            for key in ("score", f"turn {turn}", f"{q.category}"):
                ratings[key].append(j.value)
            if j.probs:  # a forced-form judge: also its expected rating
                ratings["expected score"].append(sum(p * r for p, r in zip(j.probs[0], RATINGS)))
        row = {"score": mean(ratings["score"]), "turn 1": mean(ratings["turn 1"]), "turn 2": mean(ratings["turn 2"])}
        if ratings["expected score"]:
            row["expected score"] = mean(ratings["expected score"])
        row |= {cat: mean(ratings[cat]) for cat in sorted({q.category for q in bench.questions})}
        metrics[system.spec] = row | {"n turns graded": len(ratings["score"])}
    return SuiteResult(
        suite="mtbench",
        metrics=metrics,
        headline=["score", "turn 1", "turn 2"],
        settings={**ctx.describe(), "data": bench.paths, "sampling": sampling, "judge_prompts": bench.describe_prompts()},
        items=records,
        errors=errors,
    )
