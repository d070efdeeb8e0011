import pytest

from pippin.train.guard import DegenerateGuard

ANSWER = (
    "<<A Walk in Autumn>>\n\nThe leaves turned red and gold along the river path, and we walked until the light faded. "
    "Nobody spoke much; the cold air said enough."
)


@pytest.mark.parametrize(
    "reply,why",
    [
        ("<<Your answer>>", "no content"),
        ("[Your Full Name]\n[Your Full Name]\n[Your Address]\n[Your Full Name]", "no content"),
        ("<<Title>>\n\n****\n\n****\n\n*Section 1*", "no content"),  # markup and a title, three words in all
        ("", "no content"),
        ("I'm a Rocket, " * 30, "loop"),
        ("The story is about friendship. " * 12, "loop"),
        (ANSWER, None),
        ("Dear [Manager's Name], I would like to request a larger budget for the next quarter, for the new hires.", None),
        ("Tokyo is the capital of Japan.", None),
    ],
)
def test_degenerate_replies_are_named_and_real_answers_pass(reply, why):
    assert DegenerateGuard().reason(reply) == why


def test_the_guard_zeroes_only_degenerate_rewards_and_its_thresholds_are_settings():
    g = DegenerateGuard()
    assert g(1.0, "<<Your answer>>") == 0.0 and g(0.75, ANSWER) == 0.75
    looped = "one two three four one two three four one two three"  # 11 words: too short to call a loop
    assert DegenerateGuard(min_distinct=0.9).reason(looped) is None
    long = "alpha beta gamma delta epsilon zeta " * 4  # 24 words, 6 distinct 4-grams of 21
    assert DegenerateGuard(min_distinct=0.25).reason(long) is None and DegenerateGuard(min_distinct=0.3).reason(long) == "loop"
