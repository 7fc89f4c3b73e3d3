"""The local ROUGE module agrees with rouge_score called directly."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from loraflow import rouge

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
PRED = "the model improves summarization of long scientific papers"
REFS = ["a model that improves the summarization of scientific papers", "we propose a new dataset"]


def direct(pred: str, refs: list[str], rouge_type: str):
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
    return scorer.score_multi(refs, pred)[rouge_type]


@pytest.mark.parametrize("rouge_type", TYPES)
def test_single_reference_matches_rouge_score(rouge_type):
    got = rouge.score([PRED], [[REFS[0]]])
    want = direct(PRED, [REFS[0]], rouge_type)
    assert got[f"{rouge_type}_precision"] == pytest.approx(want.precision)
    assert got[f"{rouge_type}_recall"] == pytest.approx(want.recall)
    assert got[f"{rouge_type}_fmeasure"] == pytest.approx(want.fmeasure)
    assert 0.2 < got[f"{rouge_type}_fmeasure"] < 1.0  # a partial match, not a degenerate 0 or 1


def test_best_reference_wins_even_when_it_is_not_the_first():
    refs = [REFS[1], REFS[0]]
    best = rouge.score([PRED], [refs])["rougeL_fmeasure"]
    assert best == pytest.approx(direct(PRED, [REFS[0]], "rougeL").fmeasure)
    assert best > rouge.score([PRED], [[REFS[1]]])["rougeL_fmeasure"]


def test_mean_over_examples_and_plain_string_references():
    preds, refs = [PRED, "we propose a dataset"], [REFS[0], REFS[1]]
    got = rouge.score(preds, refs)["rouge1_fmeasure"]
    want = (direct(preds[0], [refs[0]], "rouge1").fmeasure + direct(preds[1], [refs[1]], "rouge1").fmeasure) / 2
    assert got == pytest.approx(want)
    per = rouge.score(preds, refs, per_example=True)["rouge1_fmeasure"]
    assert len(per) == 2 and per[0] != per[1]


def test_rougelsum_splits_sentences():
    pred = "The cat sat on the mat. The dog ate the food."
    ref = "The dog ate the food. The cat sat on the mat."
    got = rouge.score([pred], [[ref]])
    want = direct(pred.replace(". ", ".\n"), [ref.replace(". ", ".\n")], "rougeLsum")
    assert got["rougeLsum_fmeasure"] == pytest.approx(want.fmeasure) == pytest.approx(1.0)
    assert got["rougeL_fmeasure"] < 0.8  # summary-level LCS differs from plain LCS here


def test_identical_and_empty():
    assert rouge.score(["same words here"], [["same words here"]])["rougeL_fmeasure"] == pytest.approx(1.0)
    assert rouge.score([""], [["anything at all"]])["rouge1_fmeasure"] == 0.0


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references: pass one reference"):
        rouge.score(["a", "b"], [["a"]])
