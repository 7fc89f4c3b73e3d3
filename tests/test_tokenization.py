"""Prompt rendering, label masking, truncation and the tokenize stage on a real GPT-2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.artifacts import Handle
from loraflow.collator import IGNORE_INDEX, CompletionCollator, left_pad
from loraflow.config import PromptConfig
from loraflow.prompts import PromptError, render_prompt
from loraflow.tokenization import encode_example, load_tokenizer, tokenize_data

ROW = {"input": "We study the effect of pretraining on long documents.", "target": "Pretraining helps.", "aspect": "outcome"}


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


def template(**kw) -> PromptConfig:
    return PromptConfig(style="template", template="Summarize the {aspect}:\n{input}\nSummary:", **kw)


def test_template_and_chat_rendering(tok):
    assert render_prompt(ROW, template(), tok) == f"Summarize the outcome:\n{ROW['input']}\nSummary:"
    chat = render_prompt(ROW, PromptConfig(style="chat", template="{input}", system="Be brief."), tok)
    assert chat == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{ROW['input']}<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_template_field_lists_columns(tok):
    with pytest.raises(PromptError, match=r"uses \{title\}.*use one of \{input\}, \{target\}, \{aspect\}"):
        render_prompt(ROW, PromptConfig(style="template", template="{title}: {input}"), tok)


def test_labels_mask_the_prompt_and_keep_the_completion(tok):
    enc = encode_example(ROW, template(), tok)
    n_prompt = len(enc["prompt_ids"])
    assert enc["input_ids"][:n_prompt] == enc["prompt_ids"]
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    completion = enc["labels"][n_prompt:]
    assert completion == enc["input_ids"][n_prompt:] and IGNORE_INDEX not in completion
    assert tok.decode(completion[:-1]) == " Pretraining helps." or tok.decode(completion[:-1]) == "Pretraining helps."
    assert completion[-1] == tok.eos_token_id and enc["truncated"] is False


def test_truncation_cuts_the_input_never_the_target_or_instruction(tok):
    long_row = {**ROW, "input": " ".join(["word"] * 400)}
    cfg = template(max_length=64, max_target_length=16)
    enc = encode_example(long_row, cfg, tok)
    assert enc["truncated"] is True and len(enc["input_ids"]) <= 64
    text = tok.decode(enc["prompt_ids"])
    assert text.startswith("Summarize the outcome:") and text.endswith("Summary:")
    target = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(target[:-1]).strip() == "Pretraining helps."


def test_long_target_is_cut_to_max_target_length_and_keeps_eos(tok):
    enc = encode_example({**ROW, "target": "very " * 100}, template(max_length=128, max_target_length=10), tok)
    target = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert len(target) == 10 and target[-1] == tok.eos_token_id


def test_collator_pads_right_with_ignored_labels():
    batch = CompletionCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _data_handle(tmp_path: Path, n_long: int = 0) -> Handle:
    import datasets

    def rows(n, prefix):
        return [{"input": f"{prefix} text {i} " + ("filler " * 300 if i < n_long else ""), "target": f"t {i}",
                 "references": [f"t {i}", "other"], "aspect": "outcome"} for i in range(n)]

    path = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(8, "train")),
                          "test": datasets.Dataset.from_list(rows(4, "test"))}).save_to_disk(str(path / "dataset"))
    return Handle(stage="data", path=str(path), fingerprint=f"fp{n_long}")


def test_stage_writes_arrow_and_stats_and_reuses_its_folder(tmp_path, gpt2_tokenizer_dir):
    import datasets

    data = _data_handle(tmp_path, n_long=3)
    cfg = template(max_length=96, max_target_length=16)
    h = tokenize_data(data, cfg, gpt2_tokenizer_dir, tmp_path / "out")
    ds = datasets.load_from_disk(str(Path(h.path) / "dataset"))
    assert ds["train"].column_names == ["input_ids", "labels"] and len(ds["train"]) == 8
    assert {"prompt_ids", "references"} <= set(ds["test"].column_names)
    stats = json.loads((Path(h.path) / "stats.json").read_text())
    assert stats["train"]["truncated"] == 3 and stats["test"]["truncated"] == 3
    assert stats["train"]["max_prompt_tokens"] + stats["train"]["max_target_tokens"] <= 96
    again = tokenize_data(data, cfg, gpt2_tokenizer_dir, tmp_path / "out")
    assert again.fingerprint == h.fingerprint
    other = tokenize_data(data, template(max_length=97, max_target_length=16), gpt2_tokenizer_dir, tmp_path / "out")
    assert other.fingerprint != h.fingerprint


def test_stage_fails_clearly_when_nothing_fits(tmp_path, gpt2_tokenizer_dir):
    cfg = PromptConfig(style="template", template="x " * 40 + "{input}", max_length=32, max_target_length=8)
    with pytest.raises(PromptError, match="raise prompt.max_length"):
        tokenize_data(_data_handle(tmp_path), cfg, gpt2_tokenizer_dir, tmp_path / "out")
    assert not list((tmp_path / "out").glob("tokenize/*/stats.json"))
