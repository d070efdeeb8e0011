"""IFEval loading, strict/loose checking and scoring; on the GPT-4 responses, upstream's results and the paper's numbers."""

import dataclasses
import json

import pytest

from pippin.errors import PippinError
from pippin.eval.ifeval import IFEvalItem, check_response, load_ifeval, load_responses, loose_variants, score
from pippin.eval.ifeval_checks import CHECKERS
from tests.conftest import SHARED_DATA

IFEVAL = SHARED_DATA / "ifeval"
# Zhou et al. 2023, Table 3, GPT-4 (percent).
PAPER_GPT4 = {"prompt_strict": 76.89, "instruction_strict": 83.57, "prompt_loose": 79.30, "instruction_loose": 85.37}


def row(key=1, prompt="Write a poem.", ids=("punctuation:no_comma",), kwargs=({},)):
    return {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": list(kwargs)}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_ifeval_reads_and_validates_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            row(),
            "",
            row(key=2, ids=["length_constraints:number_words"], kwargs=[{"num_words": 5, "relation": "less than", "letter": None}]),
        ],
    )
    items = load_ifeval(path)
    assert [i.key for i in items] == [1, 2]
    assert items[1].kwargs == [{"num_words": 5, "relation": "less than"}]  # nulls (HF format) dropped


def test_load_ifeval_names_every_malformed_line(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            row(),
            row(key=2, ids=["punctuation:no_commas"]),
            {"key": 3, "prompt": "x"},
            row(key=4, ids=["punctuation:no_comma", "startend:quotation"], kwargs=[{}]),
            row(key=5, ids=["length_constraints:number_words"], kwargs=[{"num_words": 5, "relation": "about"}]),
            row(key="six"),
        ],
    )
    with pytest.raises(PippinError) as e:
        load_ifeval(path)
    msg = str(e.value)
    assert msg.startswith("5 malformed IFEval row(s)")
    assert f"{path}:2: IFEval item 2: unknown instruction id 'punctuation:no_commas'" in msg
    assert f"{path}:3: missing field(s) ['instruction_id_list', 'kwargs']" in msg
    assert f"{path}:4: IFEval item 4: kwargs must be a list with one object per instruction id" in msg
    assert f"{path}:5: IFEval item 5: length_constraints:number_words: relation must be one of" in msg
    assert f"{path}:6: IFEval item key must be an integer" in msg
    assert ":1:" not in msg


def test_load_ifeval_rejects_bad_json_and_missing_file(tmp_path):
    with pytest.raises(PippinError, match=r"in.jsonl:2: not valid JSON"):
        load_ifeval(write_jsonl(tmp_path / "in.jsonl", [row(), "{oops"]))
    with pytest.raises(PippinError, match="does not exist"):
        load_ifeval(tmp_path / "missing.jsonl")
    with pytest.raises(PippinError, match=r"r.jsonl:1: expected an object with string fields"):
        load_responses(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "response": None}]))


def test_loose_variants_follow_upstream_order():
    assert loose_variants("first\n*mid*\nlast") == [
        "first\n*mid*\nlast",
        "first\nmid\nlast",
        "*mid*\nlast",
        "first\n*mid*",
        "*mid*",
        "mid\nlast",
        "first\nmid",
        "mid",
    ]


def test_loose_accepts_a_preamble_line_and_stars_that_strict_rejects():
    item = IFEvalItem(key=1, prompt="p", instruction_id_list=["startend:quotation", "punctuation:no_comma"], kwargs=[{}, {}])
    response = 'Sure! Here it is\n"No commas in here"'
    assert check_response(item, response) == [False, True]
    assert check_response(item, response, loose=True) == [True, True]
    titled = IFEvalItem(key=2, prompt="q", instruction_id_list=["change_case:english_lowercase"], kwargs=[{}])
    assert check_response(titled, "Title\nthis is all lower case and it is english.", loose=True) == [True]


def test_empty_response_follows_nothing():
    item = IFEvalItem(
        key=1, prompt="p", instruction_id_list=["punctuation:no_comma", "keywords:forbidden_words"], kwargs=[{}, {"forbidden_words": ["x"]}]
    )
    assert check_response(item, "  \n ") == [False, False]
    assert check_response(item, "\n", loose=True) == [False, False]


def test_score_counts_prompts_and_instructions_and_records_errors():
    items = [
        IFEvalItem(key=1, prompt="a", instruction_id_list=["punctuation:no_comma", "startend:quotation"], kwargs=[{}, {}]),
        IFEvalItem(key=2, prompt="b", instruction_id_list=["punctuation:no_comma"], kwargs=[{}]),
        IFEvalItem(key=3, prompt="c", instruction_id_list=["punctuation:no_comma"], kwargs=[{}]),
        IFEvalItem(key=4, prompt="d", instruction_id_list=["punctuation:no_comma"], kwargs=[{}]),
    ]
    responses = {"a": 'Intro, then\n"quoted, here"', "b": "fine", "c": None}
    s = score(items, responses)
    # Key 1: strict [no comma: False, quotation: False]; loose drops the intro line -> quotation True.
    assert [r.strict for r in s.results] == [[False, False], [True]]
    assert [r.loose for r in s.results] == [[False, True], [True]]
    assert (s.n_prompts, s.n_instructions) == (2, 3)
    assert (s.prompt_strict, s.instruction_strict) == (50.0, pytest.approx(100 / 3))
    assert (s.prompt_loose, s.instruction_loose) == (50.0, pytest.approx(200 / 3))
    assert s.errors == ["key 3: response is NoneType, not a string", "key 4: no response for its prompt"]
    assert s.per_instruction["punctuation:no_comma"].n == 2
    assert s.per_instruction["startend:quotation"].loose == 100.0
    assert "prompt-level" in s.table() and "2 errors" in s.table()


@pytest.fixture(scope="module")
def gpt4():
    if not (IFEVAL / "input_data.jsonl").is_file():
        pytest.skip(f"IFEval data not found under {IFEVAL}")
    return load_ifeval(IFEVAL / "input_data.jsonl"), load_responses(IFEVAL / "input_response_data_gpt4_20231107_145030.jsonl")


def test_data_uses_exactly_the_registered_instruction_ids(gpt4):
    items, _ = gpt4
    assert len(items) == 541
    assert {i for item in items for i in item.instruction_id_list} == set(CHECKERS)


def test_gpt4_prompt_without_response_is_an_error_not_a_failure(gpt4):
    # Upstream later reworded prompt 2785; the response file still answers the old wording.
    s = score(*gpt4)
    assert s.errors == ["key 2785: no response for its prompt"]
    assert (s.n_prompts, s.n_instructions) == (540, 832)


def gpt4_as_scored_in_the_paper(items, responses):
    # Score prompt 2785 as the paper did: its original text ("at least one placeholder"), which the response answers.
    (old_prompt,) = [p for p in responses if p.startswith("What is inside Shinto shrines?") and "at least one placeholder" in p]
    return [
        dataclasses.replace(item, prompt=old_prompt, kwargs=[{"num_highlights": 3}, {"num_placeholders": 1}]) if item.key == 2785 else item
        for item in items
    ]


def test_gpt4_reproduces_paper_numbers(gpt4):
    items, responses = gpt4
    s = score(gpt4_as_scored_in_the_paper(items, responses), responses)
    assert (s.n_prompts, s.n_instructions, s.errors) == (541, 834, [])
    for name, paper in PAPER_GPT4.items():
        assert getattr(s, name) == pytest.approx(paper, abs=0.6), name
    # Strict: 418 of 541 prompts and 699 of 834 instructions; the paper has 416 and 697. The two are prompts 1122 and
    # 1129, whose letter_frequency "letter" is "#" and "!": upstream's checker swaps a non-letter for a random letter
    # (instructions.py, LetterFrequencyChecker), we count the character asked for. Both prompts pass all else, so
    # failing those two instructions gives exactly the paper's 416 and 697.
    strict = {r.key: r.strict for r in s.results}
    assert sum(map(all, strict.values())) == 418 and sum(map(sum, strict.values())) == 699
    assert strict[1122] == [True, True] and strict[1129] == [True, True]
    # Loose: 432 prompts and 715 instructions, the paper 429 and 712; upstream's checker run on this file gives ours
    # (see below), so the paper's loose run differs from its released code by those two prompts and one more.
    loose = {r.key: r.loose for r in s.results}
    assert sum(map(all, loose.values())) == 432 and sum(map(sum, loose.values())) == 715


# (prompt key, instruction index, strict, loose): google-research's checker (langdetect, NLTK Punkt) on these GPT-4
# answers, as its evaluation_main wrote them (eval_results_strict/loose.jsonl of Podtech-AI/IFEval's first commit).
# The hand-written language identifier and sentence splitter pippin had before got each of these wrong.
UPSTREAM = [
    (279, 0, True, True),  # change_case:english_lowercase, a lower-case English poem
    (2571, 0, False, False),  # change_case:english_capital, the answer "A": langdetect reads Tagalog
    (3572, 0, True, True),  # change_case:english_capital, "FARE INSIGHT ANALYTICS"
    (3617, 0, True, True),  # change_case:english_capital, a numbered list of three names
    (1174, 1, False, False),  # length_constraints:number_sentences "less than 6": NLTK counts 6
]


@pytest.mark.parametrize("key, index, strict, loose", UPSTREAM)
def test_gpt4_answers_are_checked_as_upstream_checks_them(gpt4, key, index, strict, loose):
    items, responses = gpt4
    (item,) = [i for i in items if i.key == key]
    response = responses[item.prompt]
    assert check_response(item, response)[index] is strict
    assert check_response(item, response, loose=True)[index] is loose
