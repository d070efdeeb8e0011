"""IFEval scoring: load the prompts, check responses strictly and loosely, report the four accuracies.

Follows google-research/instruction_following_eval (`evaluation_lib.py`) and the paper (Zhou et al. 2023,
arXiv:2311.07911): a prompt is followed when all of its instructions are; strict checks the response as
given, loose also accepts any of 7 variants (first line removed, last line removed, both, each of these and
the original with every "*" removed). An empty response follows nothing. Accuracies are in percent.
The checkers live in `pippin.eval.ifeval_checks`. Rows are validated on load; a prompt without a usable
response is recorded in `IFEvalScore.errors` and left out of every count instead of scoring as a failure.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pippin.errors import PippinError
from pippin.eval.ifeval_checks import CHECKERS, validate_kwargs


@dataclass(frozen=True, kw_only=True)
class IFEvalItem:
    """One IFEval prompt and the instructions it carries (one kwargs dict per instruction id)."""

    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, int):
            raise PippinError(f"IFEval item key must be an integer, got {self.key!r}.")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise PippinError(f"IFEval item {self.key}: prompt must be a non-empty string.")
        if not isinstance(self.instruction_id_list, list) or not self.instruction_id_list:
            raise PippinError(f"IFEval item {self.key}: instruction_id_list must be a non-empty list.")
        if not isinstance(self.kwargs, list) or len(self.kwargs) != len(self.instruction_id_list):
            raise PippinError(f"IFEval item {self.key}: kwargs must be a list with one object per instruction id.")
        try:
            cleaned = [validate_kwargs(i, k) for i, k in zip(self.instruction_id_list, self.kwargs)]
        except ValueError as e:
            raise PippinError(f"IFEval item {self.key}: {e}.") from None
        object.__setattr__(self, "kwargs", cleaned)


@dataclass(frozen=True)
class IFEvalResult:
    """Per-instruction outcomes for one prompt."""

    key: int
    strict: list[bool]
    loose: list[bool]


@dataclass(frozen=True)
class InstructionAccuracy:
    """Accuracy (percent) of one instruction id over the prompts that carry it."""

    n: int
    strict: float
    loose: float


@dataclass(kw_only=True)
class IFEvalScore:
    """The four IFEval accuracies in percent, with counts, per-instruction accuracy and per-prompt results."""

    prompt_strict: float
    instruction_strict: float
    prompt_loose: float
    instruction_loose: float
    n_prompts: int
    """Prompts scored (those with a usable response)."""
    n_instructions: int
    per_instruction: dict[str, InstructionAccuracy] = field(default_factory=dict)
    results: list[IFEvalResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """One line per prompt that could not be scored (no response, or not a string); not counted anywhere."""

    def table(self) -> str:
        """A readable plain-text report."""
        lines = [
            f"IFEval: {self.n_prompts} prompts, {self.n_instructions} instructions"
            + (f", {len(self.errors)} errors" if self.errors else ""),
            f"{'':<54}{'strict':>8}{'loose':>8}",
            f"{'prompt-level':<54}{self.prompt_strict:8.2f}{self.prompt_loose:8.2f}",
            f"{'instruction-level':<54}{self.instruction_strict:8.2f}{self.instruction_loose:8.2f}",
        ]
        for iid, acc in sorted(self.per_instruction.items()):
            lines.append(f"  {iid + f' ({acc.n})':<52}{acc.strict:8.2f}{acc.loose:8.2f}")
        return "\n".join(lines)


def _read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    path = Path(path)
    if not path.is_file():
        raise PippinError(f"{path} does not exist; pass the path of a JSON-lines file.")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PippinError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line.") from None
    return rows


def load_ifeval(path: str | Path) -> list[IFEvalItem]:
    """Read IFEval prompts (`input_data.jsonl`: key, prompt, instruction_id_list, kwargs).

    Every row is validated; if any is malformed nothing is returned and the PippinError names each bad line.
    """
    items, problems = [], []
    for n, row in _read_jsonl(path):
        try:
            if not isinstance(row, dict):
                raise PippinError("a row must be a JSON object")
            if missing := [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in row]:
                raise PippinError(f"missing field(s) {missing}")
            items.append(
                IFEvalItem(key=row["key"], prompt=row["prompt"], instruction_id_list=row["instruction_id_list"], kwargs=row["kwargs"])
            )
        except PippinError as e:
            problems.append(f"{path}:{n}: {e}")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise PippinError(f"{len(problems)} malformed IFEval row(s); fix them and rerun:\n  {shown}")
    return items


def load_responses(path: str | Path) -> dict[str, str]:
    """Read model responses (JSON lines with `prompt` and `response`) into {prompt: response}."""
    responses = {}
    for n, row in _read_jsonl(path):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise PippinError(f"{path}:{n}: expected an object with string fields 'prompt' and 'response'.")
        responses[row["prompt"]] = row["response"]
    return responses


def loose_variants(response: str) -> list[str]:
    """The response and its 7 loosened variants, in upstream's order."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def check_response(item: IFEvalItem, response: str, *, loose: bool = False) -> list[bool]:
    """Whether `response` follows each of the item's instructions (strict, or loose: any variant passes)."""
    candidates = loose_variants(response) if loose else [response]
    return [
        any(r.strip() and CHECKERS[iid].fn(r, **kwargs) for r in candidates) for iid, kwargs in zip(item.instruction_id_list, item.kwargs)
    ]


def _percent(num: int, den: int) -> float:
    return 100.0 * num / den if den else 0.0


def score(items: list[IFEvalItem], responses: dict[str, str]) -> IFEvalScore:
    """Score responses (keyed by prompt text) against the items; see `IFEvalScore`."""
    scored: list[tuple[IFEvalItem, IFEvalResult]] = []
    errors = []
    for item in items:
        if item.prompt not in responses:
            errors.append(f"key {item.key}: no response for its prompt")
            continue
        response = responses[item.prompt]
        if not isinstance(response, str):
            errors.append(f"key {item.key}: response is {type(response).__name__}, not a string")
            continue
        result = IFEvalResult(key=item.key, strict=check_response(item, response), loose=check_response(item, response, loose=True))
        scored.append((item, result))
    results = [r for _, r in scored]
    per_id: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, strict, loose
    for item, r in scored:
        for iid, s, lo in zip(item.instruction_id_list, r.strict, r.loose):
            per_id[iid][0] += 1
            per_id[iid][1] += s
            per_id[iid][2] += lo
    n_prompts, n_instructions = len(results), sum(len(r.strict) for r in results)
    return IFEvalScore(
        prompt_strict=_percent(sum(all(r.strict) for r in results), n_prompts),
        instruction_strict=_percent(sum(sum(r.strict) for r in results), n_instructions),
        prompt_loose=_percent(sum(all(r.loose) for r in results), n_prompts),
        instruction_loose=_percent(sum(sum(r.loose) for r in results), n_instructions),
        n_prompts=n_prompts,
        n_instructions=n_instructions,
        per_instruction={iid: InstructionAccuracy(n=n, strict=_percent(s, n), loose=_percent(lo, n)) for iid, (n, s, lo) in per_id.items()},
        results=results,
        errors=errors,
    )
