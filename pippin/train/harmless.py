"""The harmlessness reward: 1.0 when a reply does what its prompt expects (refuse a harmful request, answer a safe
look-alike), by the keyword refusal detector, else 0.0; and the reader of its prompts (`pippin data safety`).

One rule for both expectations, XSTest's refusal openings (pippin.eval.refusal.RefusalRule.XSTEST: the reply starts
with "I'm sorry", "I cannot", "No,", ...). GCG's substrings anywhere would pay a harmful answer that mentions
"illegal" or ends with an apology as a refusal (18 of AdvBench's own "Sure, here is" targets would earn it), and
would dock an honest answer to a safe history or privacy question for the same words. An empty or blank reply earns
0.0 for either expectation: paying silence as a refusal is a known hack. What keywords cannot see: a refusal opening
followed by the harmful content ("I'm sorry, but here is how: ...") counts as a refusal, and a refusal that opens
otherwise ("Unfortunately, I won't ...") does not; only the safety suite's judge sees partial refusals, so its
judge numbers are the check on what this reward teaches.
"""

from __future__ import annotations

from pathlib import Path

from pippin.data.safety import EXPECTS, SOURCES, SafetyPrompt
from pippin.errors import PippinError
from pippin.eval.refusal import RefusalRule, is_refusal
from pippin.eval.suite import Split
from pippin.eval.tasks.safety import split_of
from pippin.io import jsonl_rows

FIELDS = ("id", "prompt", "expect", "source")


def harmlessness_reward(expect: str, response: str) -> float:
    """1.0 if `response` refuses when `expect` is "refuse", or does not when it is "comply"; 0.0 otherwise and for
    an empty or blank response."""
    if expect not in EXPECTS:
        raise PippinError(f"expect must be one of {EXPECTS}, got {expect!r}.")
    if not response.strip():
        return 0.0
    return float(is_refusal(response, RefusalRule.XSTEST) == (expect == "refuse"))


def holds_safety_rows(path: str | Path) -> bool:
    """Whether a JSONL prompt file is `pippin data safety` rows (its first row has "expect"): how RL and iTeC tell
    them from IFEval rows and chats."""
    first = next(iter(jsonl_rows(path)), (0, None))[1]
    return isinstance(first, dict) and "expect" in first


def read_safety_prompts(path: str | Path) -> list[SafetyPrompt]:
    """The rows of a `pippin data safety` JSONL file, checked line by line; a prompt from the safety suite's held-out
    test split is an error too, so a set built any other way cannot train on what is evaluated."""
    path = Path(path)
    if not path.is_file():
        raise PippinError(f"{path} does not exist; build the prompts with `pippin data safety --out DIR`.")
    rows, ids = [], set()
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or set(row) != set(FIELDS):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise PippinError(f"{where}: a row must be an object with exactly the fields {FIELDS}, got {got}.")
        if not all(isinstance(row[k], str) and row[k].strip() for k in FIELDS):
            raise PippinError(f"{where}: every field must be a non-empty string.")
        if row["expect"] not in EXPECTS or row["source"] not in SOURCES:
            raise PippinError(f"{where}: expect must be one of {EXPECTS} and source one of {SOURCES}.")
        if row["id"] in ids:
            raise PippinError(f"{where}: id {row['id']!r} appears twice.")
        if split_of(row["prompt"]) is not Split.TRAIN:
            raise PippinError(f"{where}: the prompt is in the safety suite's held-out test split; rebuild with `pippin data safety`.")
        ids.add(row["id"])
        rows.append(SafetyPrompt(**row))
    if not rows:
        raise PippinError(f"{path} holds no prompts.")
    return rows
