"""Chat datasets (data.format=messages): conversations rendered once by the chat template, the loss on the
assistant's turns only, evaluation on the last answer; bad conversations fail in one line naming the row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loraflow.stages.prompts import IGNORE_INDEX
from loraflow.config import PromptConfig, build_config
from loraflow.stages.data import DataError
from tests_support import ANIMALS, COLORS, prepare_data
from loraflow.stages.tokenize import bos_prefix, load_tokenizer

GREETING = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi, send me a report."}]


def write_conversations(path: Path, n: int = 96) -> Path:
    """The toy task of tests_support.write_examples as conversations; every third one opens with a ShareGPT-style
    greeting exchange (from/value keys), so the last assistant turn is not the only one."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n):
            color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
            text = f"Report {i}: yesterday we saw a {color} {animal} near the old river bank at dawn."
            turns = [{"role": "user", "content": text}, {"role": "assistant", "content": f"a {color} {animal}"}]
            fh.write(json.dumps({"messages": (GREETING if i % 3 == 0 else []) + turns}) + "\n")
    return path


def chat_config(tmp_path: Path, source: Path, model_dir: Path, **prompt):
    return build_config({
        "data": {"source": str(source), "format": "messages", "test_size": 0.125},
        "prompt": {"style": "chat", "max_length": 96, "max_target_length": 16, **prompt},
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"mode": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 24, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 4,
                  "save_steps": 100, "warmup_steps": 0, "lr_scheduler_type": "constant", "report_to": []},
        "eval": {"max_new_tokens": 6, "batch_size": 8},
        "run": {"output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
    })


def labelled_text(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("train_on", ["last_assistant", "all_assistants"])
def test_labels_are_the_assistant_turns_exactly_where_the_template_puts_them(gpt2_tokenizer_dir, train_on):
    from loraflow.stages.chat import encode_conversations

    tok = load_tokenizer(gpt2_tokenizer_dir)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, send me a report."},
                {"role": "user", "content": "Report 1: a red fox at dawn."}, {"role": "assistant", "content": "a red fox"}]
    prompt = PromptConfig(style="chat", max_length=96, max_target_length=16, train_on=train_on)
    enc = encode_conversations({"messages": [json.dumps(messages)]}, prompt, tok, bos_prefix(tok))
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    # One tokenization of the template's rendering (plus EOS: this ChatML has no special end-of-turn token).
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    last = "a red fox<|im_end|>\n" + tok.eos_token
    expected = ["Hi, send me a report.<|im_end|>\n", last] if train_on == "all_assistants" else [last]
    assert labelled_text(tok, ids, labels) == expected
    # The generation prompt is the template's rendering of everything before the last answer, with its header.
    before = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert enc["prompt_ids"][0] == tok(before, add_special_tokens=False)["input_ids"]


def test_a_long_conversation_drops_its_earliest_exchange_and_a_long_answer_keeps_its_end_of_turn(gpt2_tokenizer_dir):
    from loraflow.stages.chat import encode_conversations

    tok = load_tokenizer(gpt2_tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 40},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Report: a red fox."},
                {"role": "assistant", "content": "a red fox " * 10}]
    prompt = PromptConfig(style="chat", max_length=64, max_target_length=12)
    enc = encode_conversations({"messages": [json.dumps(messages)]}, prompt, tok, bos_prefix(tok))
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert enc["truncated"][0] and len(ids) <= 64
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and "word" not in text  # the system message stays
    assert sum(label != IGNORE_INDEX for label in labels) <= 12
    assert labelled_text(tok, ids, labels)[-1].endswith("<|im_end|>\n" + tok.eos_token)


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "hi"}], "row 0 of the pool split has no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "unknown role 'bot'.*data.role_map"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 0 \\(user\\) has empty content"),
    ("not json", "not a JSON list of messages"),
])
def test_a_bad_conversation_is_one_line_naming_the_row_and_the_fix(tmp_path, messages, error):
    source = tmp_path / "chats.jsonl"
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    good = json.dumps(good) if isinstance(messages, str) else good  # one type per column: JSON text, or lists
    source.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": good}) + "\n")
    cfg = build_config({"data": {"source": str(source), "format": "messages"}})
    with pytest.raises(DataError, match=error) as err:
        prepare_data(cfg.data, tmp_path / "runs")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs" / "data").exists() or not any((tmp_path / "runs" / "data").iterdir())


def test_extra_references_are_scored_with_the_last_answer(tmp_path):
    from loraflow.stages.data import build_splits

    source = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}],
             "more": [f"b {i}", f"c {i}"]} for i in range(20)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config({"data": {"source": str(source), "format": "messages", "references_column": "more"}})
    splits, _, _ = build_splits(cfg.data, tmp_path / "scratch")
    row = splits["test"][0]
    i = row["target"].split()[1]
    assert row["references"] == [f"a {i}", f"b {i}", f"c {i}"] and row["input"] == f"user: q {i}"
    assert json.loads(row["messages"])[-1] == {"role": "assistant", "content": f"a {i}"}


def test_messages_need_the_chat_style():
    from loraflow.config import ConfigError

    with pytest.raises(ConfigError, match="data.format=messages .* set prompt.style=chat"):
        build_config({"data": {"format": "messages"}, "prompt": {"style": "template"}})


def test_a_messages_dataset_trains_and_evaluates_on_its_last_answer(tmp_path, tiny_llama_dir):
    import datasets

    from tests_support import build_model, evaluate_adapter, tokenize_data, train_adapter

    cfg = chat_config(tmp_path, write_conversations(tmp_path / "chats.jsonl"), tiny_llama_dir)
    out = tmp_path / "runs"
    data = prepare_data(cfg.data, out)
    assert data.info["format"] == "messages"
    tokenized = tokenize_data(data, cfg.prompt, cfg.model, out)
    tok = load_tokenizer(tiny_llama_dir)
    train = datasets.load_from_disk(f"{tokenized.path}/dataset")["train"]
    for row in train.select(range(6)):  # only the last answer (and its end of turn) is trained on
        (answer,) = labelled_text(tok, row["input_ids"], row["labels"])
        assert answer.startswith("a ") and answer.endswith("<|im_end|>\n" + tok.eos_token)
    model = build_model(cfg.model, cfg.quantization, cfg.lora, out)
    trained = train_adapter(cfg, tokenized, model, out)
    assert trained.info["last_logged_loss"] < 0.8 * trained.info["first_logged_loss"], trained.info
    scores = evaluate_adapter(cfg, tokenized, model, trained, out)
    predictions = [json.loads(line) for line in open(Path(scores.path) / "predictions.jsonl")]
    assert len(predictions) == scores.info["n_examples"] == data.info["n_test"] > 0
    for p in predictions:  # scored against the last assistant turn
        assert p["references"][0].startswith("a ") and p["references"][0].count(" ") == 2
    assert scores.info["finetuned"]["rougeL_fmeasure"] > scores.info["base"]["rougeL_fmeasure"]
