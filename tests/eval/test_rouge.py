"""The summarization suite's ROUGE (rouge-score, stemmed, best reference per variant) on hand-computed examples."""

import pytest

from pippin.eval.tasks.summarization import best_rouge


def test_equal_length_sentences():
    # unigrams: the x2, cat, on, mat = 5 of 6; bigrams: "the cat", "on the", "the mat" = 3 of 5; LCS "the cat on the mat" = 5.
    r = best_rouge("the cat sat on the mat", ["the cat is on the mat"])
    assert r == pytest.approx({"rouge1": 100 * 5 / 6, "rouge2": 100 * 3 / 5, "rougeL": 100 * 5 / 6})


def test_lin_2004_rouge_l_example_with_stemming():
    # Lin (2004), section 3.1: against "police killed the gunman", "the gunman kill police" has LCS 2 ("the gunman").
    # Stemmed, "killed" is "kill", so every unigram matches; of the bigrams only "the gunman" does.
    r = best_rouge("the gunman kill police", ["police killed the gunman"])
    assert r == pytest.approx({"rouge1": 100.0, "rouge2": 100 / 3, "rougeL": 50.0})
    assert best_rouge("police kill the gunman", ["police killed the gunman"])["rougeL"] == pytest.approx(100.0)


def test_different_lengths_give_f1_of_precision_and_recall():
    # rouge1: P = 2/4, R = 2/2; rouge2: P = 1/3, R = 1/1.
    r = best_rouge("a b c d", ["a b"])
    assert r == pytest.approx({"rouge1": 100 * 2 / 3, "rouge2": 50.0, "rougeL": 100 * 2 / 3})


def test_each_variant_takes_its_best_reference():
    # Against "d c b a" every unigram matches (rouge1 100) but no bigram and an LCS of 1; against "a b x y" the
    # bigram "a b" matches (rouge2 F1 1/3) and the LCS is 2 (rougeL 50). rouge-score's score_multi: max per variant.
    r = best_rouge("a b c d", ["a b x y", "d c b a"])
    assert r == pytest.approx({"rouge1": 100.0, "rouge2": 100 / 3, "rougeL": 50.0})


def test_empty_prediction_scores_zero():
    assert best_rouge("", ["the cat"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
