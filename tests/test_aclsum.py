"""The built-in demo set, read from the real `aclsum` package."""

from __future__ import annotations

from loraflow.aclsum import detokenize, load_aclsum


def test_detokenize_rules():
    assert detokenize("systems ( MT ) do n't work , really .") == "systems (MT) don't work, really."
    assert detokenize("a state - of - the - art model ; it 's fine : yes !") == "a state-of-the-art model; it's fine: yes!"
    assert detokenize("`` quoted text '' here") == '"quoted text" here'


def test_real_package_splits_and_aspects():
    train, test = load_aclsum("train"), load_aclsum("test")
    assert len({r["id"] for r in train}) == 100 and len({r["id"] for r in test}) == 100
    assert len(train) == 300 and {r["aspect"] for r in train} == {"challenge", "approach", "outcome"}
    assert len(load_aclsum("validation", "outcome")) == 50
    assert not {r["id"] for r in train} & {r["id"] for r in test}


def test_text_is_detokenized_and_nonempty():
    rows = load_aclsum("test", "approach")
    assert all(r["input"] and r["target"] for r in rows)
    for r in rows:
        assert " , " not in r["input"] and " ." not in r["input"] and "( " not in r["input"]
