"""Dynamic padding for training batches and left padding for generation."""

from __future__ import annotations

import pytest

from loraflow.stages.prompts import IGNORE_INDEX
from loraflow.stages.train.collators import CompletionCollator

BATCH = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "prompt_ids": [5]},
    {"input_ids": [8], "labels": [8]},
]


def test_pads_right_to_the_longest_example_with_ignored_labels():
    out = CompletionCollator(pad_token_id=0)(BATCH)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(out) == {"input_ids", "attention_mask", "labels"}  # extra keys (prompt_ids) are not passed on


def test_pad_to_multiple_of_and_left_side():
    out = CompletionCollator(pad_token_id=9, pad_to_multiple_of=4, padding_side="left")(BATCH)
    assert out["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_training_pads_each_batch_to_a_multiple_of_train_pad_to_multiple_of():
    """Repeated shapes let the CPU's kernel caches and the allocator reuse what they hold (docs/benchmarks.md)."""
    from loraflow.config import TrainConfig
    from loraflow.stages.train.stage import make_collator

    rows = [{"input_ids": list(range(1, 18)), "labels": list(range(1, 18))}]
    assert make_collator(TrainConfig(), 0)(rows)["input_ids"].shape == (1, 32)  # 17 tokens, the default 16
    assert make_collator(TrainConfig(pad_to_multiple_of=1), 0)(rows)["input_ids"].shape == (1, 17)


def test_mismatched_labels_are_an_error():
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        CompletionCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [2, 3]}])


def test_batched_generation_continues_each_prompt_as_one_at_a_time_does(tiny_llama_dir):
    """Generation left-pads a batch (the tokenizer's pad): each prompt, short or long, ends where new tokens go,
    so the batch generates what each prompt alone generates."""
    from loraflow.config import EvalConfig, ModelConfig, QuantizationConfig
    from loraflow.stages.generation import generate
    from loraflow.stages.model import load_base
    from loraflow.stages.tokenize import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    model = load_base(tiny_llama_dir, ModelConfig(), QuantizationConfig(mode="none", compute_dtype="float32")).eval()
    prompts = [tok(t)["input_ids"] for t in ("a", "the quick brown fox jumps over the lazy", "one two")]
    never = [len(tok) + 1]  # no stop: every row generates max_new_tokens
    batched = generate(model, tok, prompts, EvalConfig(max_new_tokens=6, batch_size=3), "batched", never)
    alone = [generate(model, tok, [p], EvalConfig(max_new_tokens=6, batch_size=1), "alone", never)[0] for p in prompts]
    assert batched == alone and all(batched)
