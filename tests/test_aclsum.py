"""The built-in demo set, read from the real `aclsum` package, and the detokenizer's rules."""

from __future__ import annotations

import importlib.util
import re

import pytest

from loraflow.store.aclsum import ASPECTS, AclsumError, data_dir, detokenize, load_aclsum


@pytest.mark.parametrize(
    ("tokenized", "expected"),
    [
        ("However , current systems work . Really ; yes : no ! why ?", "However, current systems work. Really; yes: no! why?"),
        ("Machine Translation ( MT ) [ 1 ] { x } systems", "Machine Translation (MT) [1] {x} systems"),
        ("it does n't , they ca n't , Spearman 's rho , we 're , I 'm", "it doesn't, they can't, Spearman's rho, we're, I'm"),
        ('the " exposure bias " problem and " blocks " .', 'the "exposure bias" problem and "blocks".'),
        ('cues ( " The colorless green " ) , and', 'cues ("The colorless green"), and'),
        ("`` PTB quotes '' too", '"PTB quotes" too'),
        ("translate ' A because B ' as ' B because A '", "translate 'A because B' as 'B because A'"),
        ("the users ' opinions and the models ' parameters", "the users' opinions and the models' parameters"),
        ("up to 20 % for $ 10 , by 16 - 63 % and 3 / 4", "up to 20% for $10, by 16-63% and 3/4"),
        ("speech / text and/or https://github.com / microsoft/ SpeechT5 .", "speech/text and/or https://github.com/microsoft/SpeechT5."),
        ("radioactive waste ... and e.g. , this", "radioactive waste... and e.g., this"),
        ("a model - which is new - works", "a model - which is new - works"),  # a spaced hyphen between words is a dash
        ("  spaces \n and\ttabs  ", "spaces and tabs"),
        ("", ""),
    ],
)
def test_detokenize_rules(tokenized, expected):
    assert detokenize(tokenized) == expected


@pytest.mark.parametrize(
    "normal",
    ['They show the word "you" is used.', "the models' parameters (see Fig. 2), state-of-the-art: 40% better."],
)
def test_detokenize_leaves_normal_text_alone(normal):
    assert detokenize(normal) == normal


def test_real_package_splits_and_aspects():
    train, val, test = load_aclsum("train"), load_aclsum("validation"), load_aclsum("test")
    assert len({r["id"] for r in train}) == 100 and len({r["id"] for r in test}) == 100
    assert len({r["id"] for r in val}) == 50
    assert len(train) == 300 and {r["aspect"] for r in train} == set(ASPECTS)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert [r["aspect"] for r in train[:3]] == list(ASPECTS)  # one row per aspect per paper, same input
    assert len({r["input"] for r in train[:3]}) == 1


def test_one_aspect_rows_carry_that_summary():
    rows = load_aclsum("test", "outcome")
    assert len(rows) == 100 and {r["aspect"] for r in rows} == {"outcome"}
    first = next(r for r in rows if r["id"] == "E09-1056")
    assert first["target"].startswith("The proposed analogy solvers significantly improve machine translation")
    assert first["input"].startswith("Handling terminology is an important matter in a translation workflow. However,")
    assert "(MT) systems" in first["input"]


def test_text_is_detokenized_and_nonempty():
    for split in ("train", "validation", "test"):
        for r in load_aclsum(split):
            assert r["input"].strip() and r["target"].strip()
            for text in (r["input"], r["target"]):
                assert " , " not in text and not re.search(r" \.(?!\d)", text), text  # ".25" is a number
                assert "( " not in text and " )" not in text and " 's" not in text and " %" not in text, text


def test_errors():
    with pytest.raises(AclsumError, match="no split 'dev': use one of train, validation, test"):
        load_aclsum("dev")
    with pytest.raises(AclsumError, match="no aspect 'method': use one of challenge, approach, outcome, all"):
        load_aclsum("train", "method")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aclsum" else real(name, *a))
    with pytest.raises(AclsumError, match=r"needs the 'aclsum' package.*install it: uv sync"):
        data_dir()
