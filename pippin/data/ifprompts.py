"""A generated prompt set for verifiable instruction following, in IFEval's row shape but not IFEval's test set.

Each prompt is a request (a form of writing times a subject, `ifprompts_bank`) followed by 1-3 instructions drawn from
IFEval's 25 instruction types, each in one of several phrasings, with kwargs that IFEval's checkers take
(`pippin.eval.ifeval_checks`), so `check_response` scores replies to them: the verifier of `pippin rl`, `pippin reward
pairs` and `pippin itec`. Instructions that cannot hold together are never combined (a table of conflicting types,
size rules such as a word limit that leaves room for the requested paragraphs, and a check that upper bounds such as
"no commas" hold for the text a reply must contain). Prompts sharing a 13-gram with IFEval's prompts are dropped
(`pippin.data.decontaminate`). Seeded and deterministic; the split into train and validation goes by a hash of the
request, so a request never appears on both sides. Tulu 3 (Lambert et al. 2024) trains with RLVR on prompts built this way.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pippin.data import TRAIN_FILE, VALIDATION_FILE, write_prompt_set
from pippin.data import ifprompts_bank as bank
from pippin.data.decontaminate import NGRAM, NGramIndex
from pippin.errors import PippinError
from pippin.eval.ifeval import IFEvalItem
from pippin.eval.ifeval_checks import CHECKERS, RELATIONS

GENERATOR_VERSION = 1
"""Bumped whenever the same seed would give different prompts."""

INSTRUCTION_IDS = tuple(sorted(CHECKERS))

# Pairs of instruction types that one reply cannot (or cannot sensibly) follow together: case rules against each
# other and against fixed mixed-case text, a non-English reply against English words, JSON against any layout outside
# it, and rules that each claim the start, the end or the division of the reply.
_CONFLICTS = {
    "change_case:english_capital": ["change_case:english_lowercase", "change_case:capital_word_frequency",
                                    "detectable_format:constrained_response", "detectable_format:multiple_sections"],
    "change_case:english_lowercase": ["change_case:capital_word_frequency", "detectable_format:constrained_response",
                                      "detectable_format:multiple_sections"],
    "language:response_language": ["change_case:english_capital", "change_case:english_lowercase", "keywords:existence",
                                   "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
                                   "change_case:capital_word_frequency", "length_constraints:number_sentences",
                                   "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
                                   "startend:end_checker", "combination:repeat_prompt",
                                   "detectable_format:constrained_response", "detectable_format:multiple_sections"],
    "detectable_format:json_format": ["change_case:english_capital", "change_case:english_lowercase",
                                      "language:response_language", "length_constraints:number_paragraphs",
                                      "length_constraints:nth_paragraph_first_word", "length_constraints:number_sentences",
                                      "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
                                      "detectable_format:multiple_sections", "detectable_format:title",
                                      "detectable_format:constrained_response", "combination:two_responses",
                                      "combination:repeat_prompt", "startend:end_checker", "startend:quotation",
                                      "detectable_content:postscript", "detectable_content:number_placeholders",
                                      "punctuation:no_comma"],
    "combination:two_responses": ["combination:repeat_prompt", "startend:end_checker", "startend:quotation",
                                  "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
                                  "length_constraints:number_words", "length_constraints:number_sentences",
                                  "detectable_content:postscript", "detectable_format:constrained_response",
                                  "detectable_format:number_bullet_lists"],
    "combination:repeat_prompt": ["startend:quotation", "length_constraints:nth_paragraph_first_word"],
    "startend:end_checker": ["detectable_content:postscript", "detectable_format:constrained_response"],
    # "***" dividers and blank-line paragraphs count paragraphs differently.
    "length_constraints:number_paragraphs": ["length_constraints:nth_paragraph_first_word"],
}  # fmt: skip
CONFLICTS = frozenset(frozenset((a, b)) for a, others in _CONFLICTS.items() for b in others)

# Instructions that cap what a reply may contain: they must hold for the text every compliant reply contains.
_UPPER_BOUND_IDS = {"punctuation:no_comma", "keywords:forbidden_words"}
_RELATION_KEYS = ("relation", "let_relation", "capital_relation")
# Text a reply must contain, by instruction (besides the cases in `_required_text`).
_REQUIRED_FIELD = {
    "startend:end_checker": "end_phrase",
    "detectable_content:postscript": "postscript_marker",
    "length_constraints:nth_paragraph_first_word": "first_word",
}
# Counts of blocks a reply must have.
_BLOCK_COUNTS = (
    ("length_constraints:number_paragraphs", "num_paragraphs"),
    ("length_constraints:nth_paragraph_first_word", "num_paragraphs"),
    ("detectable_format:number_bullet_lists", "num_bullets"),
    ("detectable_format:multiple_sections", "num_sections"),
)


@dataclass(kw_only=True)
class IFPromptsConfig:
    """What to generate."""

    n: int = 5000
    """Prompts in all (train + validation), after decontamination."""
    seed: int = 0
    val_fraction: float = 0.1
    """Share of requests (and so, about, of prompts) held out for validation."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise PippinError(f"n must be at least 1, got {self.n}.")
        if not 0 <= self.val_fraction < 1:
            raise PippinError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")


@dataclass
class IFPromptSet:
    """The generated rows, split, and a manifest that describes them (seed, counts, what was dropped)."""

    train: list[IFEvalItem]
    validation: list[IFEvalItem]
    manifest: dict = field(default_factory=dict)


def default_tasks() -> list[str]:
    """Every request of the bank: each form of writing with each subject."""
    return [form.format(s=subject) for form in bank.FORMS for subject in bank.SUBJECTS]


def _sample_kwargs(iid: str, rng: random.Random, task: str) -> dict:
    """Arguments for one instruction, in the ranges a reply of a few hundred words can meet."""
    rel = rng.choice(RELATIONS)
    low = rel == "less than"
    match iid:
        case "keywords:existence":
            return {"keywords": rng.sample(bank.KEYWORDS, rng.choice((1, 2, 2, 3)))}
        case "keywords:frequency":
            return {"keyword": rng.choice(bank.KEYWORDS), "frequency": rng.randint(2, 4 if low else 5), "relation": rel}
        case "keywords:forbidden_words":
            return {"forbidden_words": rng.sample(bank.FORBIDDEN, rng.randint(1, 3))}
        case "keywords:letter_frequency":
            letter = rng.choice(bank.RARE_LETTERS if low else bank.COMMON_LETTERS)
            return {"letter": letter, "let_frequency": rng.randint(2, 6) if low else rng.randint(5, 20), "let_relation": rel}
        case "language:response_language":
            return {"language": rng.choice(sorted(bank.LANGUAGES))}
        case "change_case:capital_word_frequency":
            return {"capital_frequency": rng.randint(3 if low else 2, 8), "capital_relation": rel}
        case "length_constraints:number_sentences":
            return {"num_sentences": rng.randint(4, 12) if low else rng.randint(3, 12), "relation": rel}
        case "length_constraints:number_words":
            return {"num_words": rng.choice((50, 80, 100, 120, 150, 200, 250) if low else (100, 150, 200, 250, 300, 400)), "relation": rel}
        case "length_constraints:number_paragraphs":
            return {"num_paragraphs": rng.randint(2, 5)}
        case "length_constraints:nth_paragraph_first_word":
            n = rng.randint(2, 5)
            return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(bank.FIRST_WORDS)}
        case "detectable_content:number_placeholders":
            return {"num_placeholders": rng.randint(2, 5)}  # from 2: the phrasings say "placeholders"
        case "detectable_content:postscript":
            return {"postscript_marker": rng.choice(bank.POSTSCRIPT_MARKERS)}
        case "detectable_format:number_bullet_lists":
            return {"num_bullets": rng.randint(2, 6)}
        case "detectable_format:number_highlighted_sections":
            return {"num_highlights": rng.randint(2, 5)}
        case "detectable_format:multiple_sections":
            return {"section_spliter": rng.choice(bank.SECTION_SPLITTERS), "num_sections": rng.randint(2, 4)}
        case "combination:repeat_prompt":
            return {"prompt_to_repeat": task}
        case "startend:end_checker":
            return {"end_phrase": rng.choice(bank.END_PHRASES)}
    return {}  # the types without arguments


def _relation(kwargs: dict) -> str | None:
    return next((kwargs[k] for k in _RELATION_KEYS if k in kwargs), None)


def _required_text(ids: list[str], kwargs: list[dict]) -> str:
    """Text that every reply following these instructions contains."""
    parts = []
    for iid, kw in zip(ids, kwargs):
        if iid == "combination:repeat_prompt":
            parts.append(kw["prompt_to_repeat"])
        elif iid == "keywords:existence":
            parts += kw["keywords"]
        elif iid == "keywords:frequency" and kw["relation"] == "at least":
            parts += [kw["keyword"]] * kw["frequency"]
        elif iid == "detectable_format:multiple_sections":
            parts += [f"{kw['section_spliter']} {i}" for i in range(1, kw["num_sections"] + 1)]
        elif iid == "detectable_format:constrained_response":
            parts.append("My answer is maybe.")
        elif iid in _REQUIRED_FIELD:
            parts.append(kw[_REQUIRED_FIELD[iid]])
    return "\n".join(parts)


def compatible(ids: list[str], kwargs: list[dict]) -> bool:
    """Whether one reply can follow all these instructions (see the module docstring)."""
    if any(frozenset((a, b)) in CONFLICTS for i, a in enumerate(ids) for b in ids[i + 1 :]):
        return False
    by_id = dict(zip(ids, kwargs))
    # The most blocks (paragraphs, bullets, sections) the reply must have; each needs words and a sentence or more.
    blocks = max([1] + [by_id[iid][name] for iid, name in _BLOCK_COUNTS if iid in by_id])
    words, sentences = by_id.get("length_constraints:number_words"), by_id.get("length_constraints:number_sentences")
    if words and words["relation"] == "less than":
        cap = words["num_words"]
        if cap < 25 * blocks or (sentences and sentences["relation"] == "at least" and cap < 8 * sentences["num_sentences"]):
            return False
        letters = by_id.get("keywords:letter_frequency")
        if letters and letters["let_relation"] == "at least" and cap < 4 * letters["let_frequency"]:
            return False
    if sentences and sentences["relation"] == "less than":
        if sentences["num_sentences"] < blocks + 2:
            return False
        if words and words["relation"] == "at least" and sentences["num_sentences"] < words["num_words"] / 20:
            return False
    nth = by_id.get("length_constraints:nth_paragraph_first_word")
    if nth and nth["nth_paragraph"] == 1 and "detectable_format:title" in by_id:  # a title line would be paragraph 1
        return False
    required = _required_text(ids, kwargs)
    return all(
        CHECKERS[iid].fn(required, **kw)
        for iid, kw in by_id.items()
        if iid in _UPPER_BOUND_IDS or (_relation(kw) == "less than" and not iid.startswith("length_constraints"))
    )


def _render(iid: str, kwargs: dict, rng: random.Random) -> str:
    """One phrasing of an instruction, filled in."""
    rel = _relation(kwargs)
    phrases = bank.PHRASES[iid]
    template = rng.choice(phrases[rel] if isinstance(phrases, dict) else phrases)
    fields = dict(kwargs)
    if rel:
        fields["cmp"] = rng.choice(bank.CMP[rel])
    if listed := kwargs.get("keywords") or kwargs.get("forbidden_words"):
        quoted = [f'"{w}"' for w in listed]
        fields["the_words"] = f"the word {quoted[0]}" if len(quoted) == 1 else f"the words {', '.join(quoted[:-1])} and {quoted[-1]}"
    if "language" in kwargs:
        fields["lang"] = bank.LANGUAGES[kwargs["language"]]
    if "nth_paragraph" in kwargs:
        fields["ordinal"] = bank.ORDINALS[kwargs["nth_paragraph"] - 1]
    return template.format(**fields)


def _sample_row(rng: random.Random, tasks: Sequence[str]) -> tuple[str, str, list[str], list[dict]] | None:
    """(request, prompt, ids, kwargs) for one random row, or None when the draw cannot be followed."""
    task = rng.choice(tasks)
    ids: list[str] = []
    for _ in range(rng.choices((1, 2, 3), weights=(3, 4, 3))[0]):
        options = [i for i in INSTRUCTION_IDS if i not in ids and all(frozenset((i, j)) not in CONFLICTS for j in ids)]
        ids.append(rng.choice(options))
    kwargs = [_sample_kwargs(iid, rng, task) for iid in ids]
    if not compatible(ids, kwargs):
        return None
    prompt = " ".join([task] + [_render(iid, kw, rng) for iid, kw in zip(ids, kwargs)])
    return task, prompt, ids, kwargs


def in_validation(task: str, val_fraction: float) -> bool:
    """Whether a request belongs to the validation split: a hash of its text, so the same on every run and seed."""
    return int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "big") / 2**64 < val_fraction


def build_ifprompts(config: IFPromptsConfig, *, reference: Sequence[str], tasks: Sequence[str] | None = None) -> IFPromptSet:
    """`config.n` distinct prompts, none sharing a 13-gram with any `reference` text (IFEval's prompts), split."""
    tasks = list(tasks) if tasks is not None else default_tasks()
    index = NGramIndex(reference)
    rng = random.Random(config.seed)
    seen: set[str] = set()
    train, validation = [], []
    n_dropped = n_duplicates = n_incompatible = 0
    for _ in range(50 * config.n + 1000):
        if len(seen) == config.n:
            break
        row = _sample_row(rng, tasks)
        if row is None:
            n_incompatible += 1
            continue
        task, prompt, ids, kwargs = row
        if prompt in seen:
            n_duplicates += 1
        elif index.shared(prompt):
            n_dropped += 1
        else:
            seen.add(prompt)
            item = IFEvalItem(key=len(seen), prompt=prompt, instruction_id_list=ids, kwargs=kwargs)
            (validation if in_validation(task, config.val_fraction) else train).append(item)
    if len(seen) < config.n:
        raise PippinError(f"Only {len(seen)} distinct prompts clear of the reference set could be made; ask for fewer (n).")
    rows = train + validation
    manifest = {
        "generator": "pippin.data.ifprompts",
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "n_train": len(train),
        "n_validation": len(validation),
        "n_requests": len(tasks),
        "instruction_counts": dict(sorted(Counter(i for r in rows for i in r.instruction_id_list).items())),
        "instructions_per_prompt": dict(sorted(Counter(str(len(r.instruction_id_list)) for r in rows).items())),
        "decontamination": {
            "ngram": NGRAM,
            "reference_prompts": len(reference),
            "reference_sha256": hashlib.sha256("\n".join(reference).encode()).hexdigest(),
            "dropped": n_dropped,
        },
        "skipped": {"duplicates": n_duplicates, "incompatible": n_incompatible},
        "files": {"train": TRAIN_FILE, "validation": VALIDATION_FILE},
    }
    return IFPromptSet(train=train, validation=validation, manifest=manifest)


def write_ifprompts(folder: str | Path, prompt_set: IFPromptSet) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl (IFEval's row shape) and manifest.json, each atomically, the manifest last."""
    return write_prompt_set(folder, prompt_set.train, prompt_set.validation, prompt_set.manifest)
