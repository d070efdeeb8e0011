"""The 25 IFEval instruction checkers (Zhou et al. 2023, arXiv:2311.07911), one function per instruction id.

Each checker takes the response and the instruction's keyword arguments and says whether the response
follows it. The rules are those of google-research/instruction_following_eval (`instructions.py`), rewritten
with the same regexes and thresholds and the same libraries: `langdetect` identifies languages (seeded, so a
score does not change from run to run; upstream leaves it unseeded) and NLTK splits sentences and words
(`pippin.eval.text`). One difference: keywords are matched literally (upstream hands them to `re` unescaped; no
IFEval keyword contains a metacharacter).
`CHECKERS` maps each id to its function and the arguments it takes, so rows can be validated on load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from langdetect import DetectorFactory, LangDetectException, detect
from langdetect.detector_factory import PROFILES_DIRECTORY

from pippin.eval.text import count_sentences, count_words, word_tokenize

RELATIONS = ("less than", "at least")
# langdetect draws random n-gram samples; a fixed seed makes its answer a function of the text.
DetectorFactory.seed = 0
# The ISO 639-1 codes langdetect can return (one profile each; Chinese is zh-cn / zh-tw).
SUPPORTED_LANGUAGES = frozenset(os.listdir(PROFILES_DIRECTORY))


@dataclass(frozen=True)
class Checker:
    """One instruction type: the check and the keyword arguments it needs (name -> type)."""

    fn: Callable[..., bool]
    args: dict[str, type] = field(default_factory=dict)


CHECKERS: dict[str, Checker] = {}


def _register(instruction_id: str, **args: type) -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    def wrap(fn: Callable[..., bool]) -> Callable[..., bool]:
        CHECKERS[instruction_id] = Checker(fn=fn, args=args)
        return fn

    return wrap


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# --- keywords ---------------------------------------------------------------------------------------------


@_register("keywords:existence", keywords=list)
def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


@_register("keywords:frequency", keyword=str, frequency=int, relation=str)
def keywords_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    count = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return _compare(count, relation, frequency)


@_register("keywords:forbidden_words", forbidden_words=list)
def keywords_forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", response, flags=re.IGNORECASE) for w in forbidden_words)


@_register("keywords:letter_frequency", letter=str, let_frequency=int, let_relation=str)
def keywords_letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(response.lower().count(letter.strip().lower()), let_relation, let_frequency)


# --- language and case ------------------------------------------------------------------------------------


def _is_language(response: str, language: str) -> bool:
    try:
        return detect(response) == language
    except LangDetectException:  # no letters to go on: upstream counts the instruction as followed
        return True


@_register("language:response_language", language=str)
def response_language(response: str, *, language: str) -> bool:
    return _is_language(response, language)


@_register("change_case:english_capital")
def english_capital(response: str) -> bool:
    return response.isupper() and _is_language(response, "en")


@_register("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    return response.islower() and _is_language(response, "en")


@_register("change_case:capital_word_frequency", capital_frequency=int, capital_relation=str)
def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    n_capital = sum(1 for word in word_tokenize(response) if word.isupper())
    return _compare(n_capital, capital_relation, capital_frequency)


@_register("punctuation:no_comma")
def no_comma(response: str) -> bool:
    return "," not in response


# --- length -----------------------------------------------------------------------------------------------


@_register("length_constraints:number_sentences", num_sentences=int, relation=str)
def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


@_register("length_constraints:number_words", num_words=int, relation=str)
def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


@_register("length_constraints:number_paragraphs", num_paragraphs=int)
def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    # Paragraphs are separated by the markdown divider "***"; an empty paragraph is only allowed at either end.
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    n = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if 0 < i < len(paragraphs) - 1:
                return False
            n -= 1
    return n == num_paragraphs


@_register("length_constraints:nth_paragraph_first_word", num_paragraphs=int, nth_paragraph=int, first_word=str)
def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    # Paragraphs are separated by "\n\n". As upstream, empty ones are not counted but still take an index.
    paragraphs = response.split("\n\n")
    n = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > n:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = re.match(r"[^.,?!'\"]*", word).group().lower()
    return n == num_paragraphs and first == first_word.lower()


# --- content and format -----------------------------------------------------------------------------------


@_register("detectable_content:number_placeholders", num_placeholders=int)
def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@_register("detectable_content:postscript", postscript_marker=str)
def postscript(response: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


@_register("detectable_format:number_bullet_lists", num_bullets=int)
def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


_CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@_register("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in _CONSTRAINED_OPTIONS)


@_register("detectable_format:number_highlighted_sections", num_highlights=int)
def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    # *single* and **double** highlights both count (a **double** one counts for its inner *...* too).
    singles = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h[2:-2].strip()]
    return len(singles) + len(doubles) >= num_highlights


@_register("detectable_format:multiple_sections", section_spliter=str, num_sections=int)
def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", response)
    return len(sections) - 1 >= num_sections


@_register("detectable_format:json_format")
def json_format(response: str) -> bool:
    value = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(fence)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


@_register("detectable_format:title")
def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# --- combination and start/end ----------------------------------------------------------------------------


@_register("combination:two_responses")
def two_responses(response: str) -> bool:
    parts = response.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(answers) == 2 and answers[0] != answers[1]


@_register("combination:repeat_prompt", prompt_to_repeat=str)
def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@_register("startend:end_checker", end_phrase=str)
def end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_register("startend:quotation")
def quotation(response: str) -> bool:
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def validate_kwargs(instruction_id: str, kwargs: dict) -> dict:
    """Check one instruction's arguments; return them without None values. Raises ValueError with the reason."""
    if instruction_id not in CHECKERS:
        raise ValueError(f"unknown instruction id {instruction_id!r}; known ids: {', '.join(sorted(CHECKERS))}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{instruction_id}: kwargs must be an object, got {type(kwargs).__name__}")
    spec = CHECKERS[instruction_id].args
    # The Hugging Face copy of IFEval fills every unused argument with null: drop those.
    given = {k: v for k, v in kwargs.items() if v is not None}
    if unknown := sorted(set(given) - set(spec)):
        raise ValueError(f"{instruction_id}: unexpected argument(s) {unknown}; it takes {sorted(spec) or 'none'}")
    if missing := sorted(set(spec) - set(given)):
        raise ValueError(f"{instruction_id}: missing argument(s) {missing}")
    for name, typ in spec.items():
        value = given[name]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{instruction_id}: {name} must be a non-negative integer, got {value!r}")
        if typ is str and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{instruction_id}: {name} must be a non-empty string, got {value!r}")
        if typ is list and not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            raise ValueError(f"{instruction_id}: {name} must be a non-empty list of strings, got {value!r}")
        if name.endswith("relation") and value not in RELATIONS:
            raise ValueError(f"{instruction_id}: {name} must be one of {RELATIONS}, got {value!r}")
    if instruction_id == "language:response_language" and given["language"] not in SUPPORTED_LANGUAGES:
        raise ValueError(f"{instruction_id}: cannot identify language {given['language']!r}; supported: {sorted(SUPPORTED_LANGUAGES)}")
    if instruction_id == "keywords:letter_frequency" and len(given["letter"].strip()) != 1:
        raise ValueError(f"{instruction_id}: letter must be a single character, got {given['letter']!r}")
    return given
