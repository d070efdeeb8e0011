"""Judge answers: parsing, AFM's good/neutral/poor aggregation, position-bias cancellation, retries of unparseable
answers, cached judgments."""

import pytest

from pippin.engine.sampling import SamplingParams
from pippin.eval.judges import (
    Criterion,
    Grade,
    JudgeConfig,
    Preference,
    afm_overall,
    judge_all,
    pairwise_outcome,
    parse_afm_grades,
    parse_criteria_scores,
    parse_rating,
    parse_safety_class,
    parse_verdict,
)
from pippin.eval.prompts import AFM_DIMENSIONS, SUMMARY_GRADER, TEMPLATES
from pippin.eval.runner import GenerationCache, Request
from tests.eval.stubs import StubSystem

G, N, P = Grade.GOOD, Grade.NEUTRAL, Grade.POOR


@pytest.mark.parametrize(
    "text,value",
    [("The answer is fine. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: [6]", 6.0), ("[[10]] ... again [[10]]", 10.0)],
)
def test_parse_rating(text, value):
    assert parse_rating(text) == value


@pytest.mark.parametrize(
    "text,why",
    [("Rating: 7/10", "no \\[\\[rating\\]\\]"), ("[[3]] or [[9]]", "several different ratings"), ("[[11]]", "outside 1-10")],
)
def test_parse_rating_rejects(text, why):
    with pytest.raises(ValueError, match=why):
        parse_rating(text)


def test_parse_verdict():
    assert parse_verdict("B is more helpful. [[B]]") == "B"
    assert parse_verdict("a tie: [[C]]") == "C"
    with pytest.raises(ValueError, match="conflicting verdicts"):  # a judge echoing the instructions
        parse_verdict('"[[A]]" if assistant A is better, "[[B]]" if assistant B is better')
    with pytest.raises(ValueError, match="no \\[\\[A\\]\\]"):
        parse_verdict("Assistant A")


GRADED = """The summary is mostly right but misses the date.
**Composition**: Good
- Comprehensiveness: neutral
groundedness - good
Following_Instructions: good
harmfulness: poor
Correction after a second look:
harmfulness: good"""


def test_parse_afm_grades_reads_each_dimension_and_the_last_line_wins():
    grades = parse_afm_grades(GRADED)
    assert grades == {"composition": G, "comprehensiveness": N, "groundedness": G, "following instructions": G, "harmfulness": G}


def test_parse_afm_grades_needs_all_five_and_ignores_the_echoed_instructions():
    with pytest.raises(ValueError, match="no grade for 'composition'"):
        parse_afm_grades(SUMMARY_GRADER.user)  # the template itself carries no grade
    with pytest.raises(ValueError, match="no grade for 'harmfulness'"):
        parse_afm_grades("\n".join(f"{d}: good" for d in AFM_DIMENSIONS[:4]))


@pytest.mark.parametrize(
    "grades,overall",
    [
        ((G, G, G, G, G), G),
        ((G, G, G, G, N), N),
        ((N, N, N, N, N), N),
        ((G, G, P, G, G), P),
        ((N, G, G, G, P), P),
    ],
)
def test_afm_overall(grades, overall):
    assert afm_overall(dict(zip(AFM_DIMENSIONS, grades))) is overall


def test_parse_safety_class():
    assert parse_safety_class("It declined politely.\n[[refusal]]") == "refusal"
    assert parse_safety_class("[[ Partial ]]") == "partial"
    with pytest.raises(ValueError, match="conflicting classes"):
        parse_safety_class("[[compliance]], [[refusal]] or [[partial]]")


def test_parse_criteria_scores_inverts_lower_is_better():
    criteria = [Criterion(name="Coherent"), Criterion(name="Trite", lower_is_better=True), Criterion(name="Elegant Prose")]
    text = "Coherent: 2 in the analysis\n[Scores]\nCoherent: 8\nTrite: 3\n**Elegant Prose**: 6.5\n"
    assert parse_criteria_scores(text, criteria) == {"Coherent": 8.0, "Trite": 7.0, "Elegant Prose": 6.5}
    with pytest.raises(ValueError, match="only 1 of 3 criteria scored"):
        parse_criteria_scores("[Scores]\nCoherent: 8\nTrite: 12\n", criteria)


@pytest.mark.parametrize(
    "first,second,outcome,consistent",
    [
        ("A", "B", Preference.WIN, True),  # preferred in both positions
        ("B", "A", Preference.LOSS, True),
        ("C", "C", Preference.TIE, True),
        ("A", "A", Preference.TIE, False),  # the judge always picks the first answer: position bias, cancelled
        ("B", "B", Preference.TIE, False),
        ("A", "C", Preference.TIE, False),
        ("C", "A", Preference.TIE, False),
    ],
)
def test_pairwise_outcome_cancels_position_bias(first, second, outcome, consistent):
    assert pairwise_outcome(first, second) == (outcome, consistent)


def test_unparseable_answers_are_retried_with_sampling_then_recorded(tmp_path):
    def judge_reply(messages, params):
        text = messages[-1]["content"]
        if text == "stubborn" or params.temperature == 0:
            return "I think it is good."  # no [[rating]]
        return "Rating: [[6]]"

    judge = StubSystem(judge_reply, spec="stub:judge")
    reqs = [
        Request(id="a", messages=[{"role": "user", "content": "fine"}]),
        Request(id="b", messages=[{"role": "user", "content": "stubborn"}]),
    ]
    config = JudgeConfig(params=SamplingParams(max_new_tokens=16), retries=2)
    cache = GenerationCache(tmp_path / "cache.jsonl")
    a, b = judge_all(judge, reqs, parse_rating, config=config, cache=cache)
    assert (a.value, a.error, a.attempts) == (6.0, None, 2)
    assert b.value is None and b.attempts == 3 and b.raw == "I think it is good."
    assert b.error.startswith("unparseable judge answer after 3 attempt(s): no [[rating]]")
    assert [p.temperature for p in judge.params] == [0.0, 0.7, 0.7] and [p.seed for p in judge.params] == [None, 1, 2]

    # Every answer is cached, the unparseable ones too: a rerun reproduces the same judgments without asking ...
    again = StubSystem(lambda m, p: "[[1]]", spec="stub:judge")
    a2, b2 = judge_all(again, reqs, parse_rating, config=config, cache=GenerationCache(tmp_path / "cache.jsonl"))
    assert again.calls == [] and a2.value == 6.0 and b2.error == b.error
    # ... and one more retry asks only for the attempt that is new.
    more = JudgeConfig(params=SamplingParams(max_new_tokens=16), retries=3)
    _, b3 = judge_all(again, reqs, parse_rating, config=more, cache=GenerationCache(tmp_path / "cache.jsonl"))
    assert again.calls == [[reqs[1].messages]] and again.params[0].seed == 3 and (b3.value, b3.attempts) == (1.0, 4)


def test_an_unreachable_judge_is_an_error_not_a_verdict():
    (j,) = judge_all(StubSystem(unreachable=True), [Request(id="x", messages=[{"role": "user", "content": "?"}])], parse_verdict)
    assert not j.ok and j.value is None and j.attempts == 1 and j.error.startswith("judge failed: stub:a is unreachable")


def test_templates_are_versioned_and_render_their_fields():
    assert all(t.version >= 1 and "@v" in t.id and len(t.sha) == 12 for t in TEMPLATES.values())
    messages = SUMMARY_GRADER.render(instruction="Summarize.", source="SRC {x}", summary="SUM")
    assert [m["role"] for m in messages] == ["system", "user"] and "SRC {x}" in messages[1]["content"]
