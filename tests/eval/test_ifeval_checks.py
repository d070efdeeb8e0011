"""Each of the 25 IFEval instruction checkers on a response that follows it and one that does not."""

import pytest

from pippin.eval.ifeval_checks import CHECKERS, validate_kwargs

# (instruction id, kwargs, a response that follows, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["dog", "cat"]}, "My Dog chased a CAT.", "My dog slept."),
    ("keywords:frequency", {"keyword": "war", "frequency": 2, "relation": "at least"}, "War, and more war.", "One war."),
    ("keywords:frequency", {"keyword": "war", "frequency": 2, "relation": "less than"}, "One war.", "War and war."),
    ("keywords:forbidden_words", {"forbidden_words": ["rich", "money"]}, "I am richer now.", "I have Money."),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "A bad one", "bAnana"),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#a #b", "#a"),
    (
        "language:response_language",
        {"language": "fr"},
        "Je pense que c'est une bonne idée et nous allons le faire.",
        "I think it is a good idea.",
    ),
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITALS AND IT IS ENGLISH.", "This is not."),
    # Short capitals as langdetect reads them (IFEval's checker): English, and Somali.
    ("change_case:english_capital", {}, "FARE INSIGHT ANALYTICS", "HELLO, HOW ARE YOU?"),
    ("change_case:english_lowercase", {}, "this is all lower case and it is english.", "This has a capital."),
    ("change_case:english_lowercase", {}, "this is all lower case and it is english.", "c'est une phrase en français et pas en anglais."),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": "at least"},
        "I LOVE NEW York.",
        "I LOVE new York.",
    ),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "I love it.", "I DON'T."),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "Only Mr. Smith came.", "One. Two."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two? Three!", "One. Two."),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one, two three", "one two"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one two", "one two three"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nfirst\n***\nsecond\n***", "first\n***\n\n***\nsecond"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "first * * * still\n***\nsecond", "just one"),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        'First part.\n\n"Then, the second.',
        "First part.\n\nAnd the second.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "first"},
        "First part.\n\nSecond part.",
        "First part.\n\nSecond.\n\nThird.",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] lives at [address].", "[name] lives here."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np.s. bye", "Hi. PS bye"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP. P. S: more", "Hi.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Title**\n* one\n- two", "* one\n* two\n  * three"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* and * *"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "**bold**", "****"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nfoo\nSection 2\nbar",
        "Section 1\nfoo",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{a: 1}"),
    ("detectable_format:json_format", {}, ' ```\n"text"\n``` ', "Here it is: {}"),
    ("detectable_format:title", {}, "<<My Title>>\nBody.", "<< >>\n<<\n>> Body."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    ("combination:two_responses", {}, "******\nA\n******\nB\n******", "A ****** ****** B"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi. "}, "  say HI. Hi there!", "Hi there! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, 'Done. any Questions?"\n', "Any questions? More."),
    ("startend:quotation", {}, '  "All of it."\n', 'Not "all" of it.'),
    ("startend:quotation", {}, '""', '"'),
]


@pytest.mark.parametrize("instruction_id, kwargs, follows, breaks", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker(instruction_id, kwargs, follows, breaks):
    check = CHECKERS[instruction_id].fn
    kwargs = validate_kwargs(instruction_id, kwargs)
    assert check(follows, **kwargs) is True
    assert check(breaks, **kwargs) is False


def test_language_checks_follow_langdetect_and_pass_text_without_letters():
    # No letters: langdetect raises, and IFEval counts the instruction as followed (a capitals check still needs capitals).
    assert CHECKERS["language:response_language"].fn("12345 !!! ...", language="fr") is True
    assert CHECKERS["change_case:english_capital"].fn("12345 !!! ...") is False
    # langdetect samples n-grams at random; seeded, a borderline text gets one answer ("Bonjour" is fr or hr unseeded).
    assert len({CHECKERS["language:response_language"].fn("Bonjour", language="fr") for _ in range(20)}) == 1


def test_every_instruction_id_has_cases():
    assert len(CHECKERS) == 25
    assert {c[0] for c in CASES} == set(CHECKERS)


def test_validate_kwargs_drops_nulls_of_the_hugging_face_format():
    assert validate_kwargs("punctuation:no_comma", {"num_words": None, "relation": None}) == {}
    assert validate_kwargs("length_constraints:number_words", {"num_words": 5, "relation": "at least", "letter": None}) == {
        "num_words": 5,
        "relation": "at least",
    }


@pytest.mark.parametrize(
    "instruction_id, kwargs, message",
    [
        ("punctuation:no_commas", {}, "unknown instruction id 'punctuation:no_commas'"),
        ("punctuation:no_comma", {"num_words": 3}, "unexpected argument(s) ['num_words']"),
        ("length_constraints:number_words", {"num_words": 3}, "missing argument(s) ['relation']"),
        ("length_constraints:number_words", {"num_words": "3", "relation": "at least"}, "num_words must be a non-negative integer"),
        ("length_constraints:number_words", {"num_words": True, "relation": "at least"}, "num_words must be a non-negative integer"),
        ("length_constraints:number_words", {"num_words": 3, "relation": "at most"}, "relation must be one of"),
        ("keywords:existence", {"keywords": []}, "keywords must be a non-empty list of strings"),
        (
            "keywords:letter_frequency",
            {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
            "letter must be a single character",
        ),
        ("language:response_language", {"language": "xx"}, "cannot identify language 'xx'"),
        ("language:response_language", {"language": "zh"}, "cannot identify language 'zh'"),  # langdetect says zh-cn / zh-tw
        ("startend:end_checker", {"end_phrase": "  "}, "end_phrase must be a non-empty string"),
    ],
)
def test_validate_kwargs_rejects(instruction_id, kwargs, message):
    with pytest.raises(ValueError) as e:
        validate_kwargs(instruction_id, kwargs)
    assert message in str(e.value)
