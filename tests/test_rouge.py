"""The local ROUGE metric (loraflow/metrics/rouge) agrees with rouge_score's RougeScorer called directly."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from loraflow.metrics import rouge
from loraflow.metrics.rouge.rouge import split_sentences

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
KEYS = [f"{t}_{p}" for t in TYPES for p in ("precision", "recall", "fmeasure")]
PRED = "the model improves summarization of long scientific papers"
GOOD = "a model that improves the summarization of scientific papers"
BAD = "we propose a new dataset"


def direct(refs: list[str], pred: str, use_stemmer: bool = True) -> dict:
    """rouge_score itself, best reference by F1 per type; the numbers our module must reproduce."""
    return rouge_scorer.RougeScorer(TYPES, use_stemmer=use_stemmer).score_multi(refs, pred)


def assert_matches(got: dict[str, float], want: dict) -> None:
    for t in TYPES:
        assert got[f"{t}_precision"] == pytest.approx(want[t].precision), t
        assert got[f"{t}_recall"] == pytest.approx(want[t].recall), t
        assert got[f"{t}_fmeasure"] == pytest.approx(want[t].fmeasure), t


def test_every_key_is_a_float_in_0_1():
    got = rouge.score([PRED], [[GOOD]])
    assert sorted(got) == sorted(KEYS)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in got.values())


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_single_reference_matches_rouge_score(use_stemmer):
    got = rouge.score([PRED], [[GOOD]], use_stemmer=use_stemmer)
    assert_matches(got, direct([GOOD], PRED, use_stemmer))
    assert 0.2 < got["rouge1_fmeasure"] < 1.0  # a partial match, not a degenerate 0 or 1


def test_stemmer_changes_the_score():
    # "improves"/"improved" and "papers"/"paper" only match after Porter stemming.
    pred, ref = "the method improves papers", "the method improved paper"
    assert rouge.score([pred], [ref], use_stemmer=True)["rouge1_fmeasure"] == pytest.approx(1.0)
    assert rouge.score([pred], [ref], use_stemmer=False)["rouge1_fmeasure"] == pytest.approx(0.5)


def test_best_reference_wins_when_it_is_the_second():
    got = rouge.score([PRED], [[BAD, GOOD]])
    assert_matches(got, direct([GOOD], PRED))  # as if only the good reference were given
    assert got["rougeL_fmeasure"] > rouge.score([PRED], [[BAD]])["rougeL_fmeasure"] + 0.3


def test_best_reference_is_chosen_per_rouge_type():
    # ref_a shares more words (rouge1), ref_b shares more bigrams (rouge2): each type takes its own best.
    pred = "cats chase mice in the barn"
    ref_a, ref_b = "mice barn cats in the chase", "cats chase dogs"
    got = rouge.score([pred], [[ref_a, ref_b]])
    assert_matches(got, direct([ref_a, ref_b], pred))
    assert got["rouge1_fmeasure"] == pytest.approx(direct([ref_a], pred)["rouge1"].fmeasure)
    assert got["rouge2_fmeasure"] == pytest.approx(direct([ref_b], pred)["rouge2"].fmeasure)


def test_plain_string_references_mean_and_per_example():
    preds, refs = [PRED, "we propose a dataset"], [GOOD, BAD]
    per = rouge.per_example(preds, refs)
    assert sorted(per) == sorted(KEYS) and all(len(v) == 2 for v in per.values())
    for i in range(2):
        assert per["rougeL_fmeasure"][i] == pytest.approx(direct([refs[i]], preds[i])["rougeL"].fmeasure)
    mean = rouge.score(preds, refs)
    assert mean["rouge1_fmeasure"] == pytest.approx(sum(per["rouge1_fmeasure"]) / 2)
    assert per["rouge1_fmeasure"][0] != pytest.approx(per["rouge1_fmeasure"][1])


@pytest.mark.parametrize(
    "pred, ref, pred_lines, ref_lines",
    [
        # Both texts have two sentences, in swapped order.
        (
            "The cat sat on the mat. The dog ate the food.",
            "The dog ate the food! The cat sat on the mat.",
            "The cat sat on the mat.\nThe dog ate the food.",
            "The dog ate the food!\nThe cat sat on the mat.",
        ),
        # Only the prediction has two sentences: its split is what lets both halves count.
        (
            "The dog ate the food. The cat sat on the mat.",
            "The cat sat on the mat while the dog ate the food.",
            "The dog ate the food.\nThe cat sat on the mat.",
            "The cat sat on the mat while the dog ate the food.",
        ),
        # Only the reference has two sentences: its split is what lets both halves count.
        (
            "The cat sat on the mat while the dog ate the food.",
            "The dog ate the food. The cat sat on the mat.",
            "The cat sat on the mat while the dog ate the food.",
            "The dog ate the food.\nThe cat sat on the mat.",
        ),
    ],
)
def test_rougelsum_scores_sentence_by_sentence(pred, ref, pred_lines, ref_lines):
    got = rouge.score([pred], [[ref]])
    # rouge_score with the sentences already on separate lines, as rougeLsum expects.
    assert_matches(got, direct([ref_lines], pred_lines))
    assert got["rougeLsum_fmeasure"] > 0.85  # every sentence is found in the other text
    assert got["rougeL_fmeasure"] < 0.8  # one LCS over the swapped sentences cannot cover both
    # Without splitting, rougeLsum would equal rougeL; the split is what makes them differ.
    assert direct([ref], pred)["rougeLsum"].fmeasure == pytest.approx(got["rougeL_fmeasure"])


def test_split_sentences():
    text = "We use BERT, e.g. the base model. Results are in Fig. 3 and Tab. 2. Smith et al. Agree!\nNew line"
    assert split_sentences(text) == [
        "We use BERT, e.g. the base model.",
        "Results are in Fig. 3 and Tab. 2.",
        "Smith et al. Agree!",
        "New line",
    ]
    assert split_sentences('He said "stop." Then J. Smith left. 3.5 is a number.') == [
        'He said "stop."',
        "Then J. Smith left.",
        "3.5 is a number.",
    ]
    assert split_sentences("") == [] and split_sentences("no punctuation at all") == ["no punctuation at all"]


def test_identical_strings_score_one():
    text = "The model works. It is fast."
    got = rouge.score([text], [[text]])
    assert got == pytest.approx({k: 1.0 for k in KEYS})


def test_empty_prediction_scores_zero():
    got = rouge.score(["", PRED], [["anything at all"], [PRED]])
    per = rouge.per_example(["", PRED], [["anything at all"], [PRED]])
    assert all(per[k][0] == 0.0 for k in KEYS)
    assert got == pytest.approx({k: 0.5 for k in KEYS})  # mean of 0 and 1


def test_length_mismatch_is_a_one_line_error_with_the_fix():
    with pytest.raises(ValueError, match=r"2 predictions but 1 references: pass exactly one reference") as err:
        rouge.score(["a", "b"], [["a"]])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no predictions"):
        rouge.per_example([], [])
    with pytest.raises(ValueError, match="example 1 has no reference"):
        rouge.score(["a", "b"], [["a"], []])


def test_metric_is_loaded_once_by_path():
    metric = rouge.load_metric()
    assert rouge.load_metric() is metric
    assert type(metric).__name__ == "Rouge"
    assert metric.compute(predictions=["a b"], references=["a b"])["rouge2_fmeasure"] == pytest.approx(1.0)
