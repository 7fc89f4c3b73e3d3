"""Stop tokens from the chat template: with an end-of-turn token that is not eos (SmolLM2/Qwen's
<|im_end|>, Llama-3's <|eot_id|>), training labels end in it and generation stops on it."""

from __future__ import annotations

import pytest
import torch

from loraflow.config import EvalConfig, LoraConfig, ModelConfig, PromptConfig, QuantizationConfig
from loraflow.stages.generation import generate
from loraflow.stages.model import attach_lora, load_base
from loraflow.stages.prompts import end_of_turn, stop_token_ids
from loraflow.stages.tokenize import encode_example, load_tokenizer
from tests_support import train_briefly

CHAT = PromptConfig(style="chat", template="Summarize: {input}")


@pytest.fixture(scope="module")
def chatml_model_dir(gpt2_tokenizer_dir, tmp_path_factory):
    """The tiny Llama with <|im_start|>/<|im_end|> as added special tokens (end of turn != eos)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.15)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("chatml-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_labels_end_in_the_end_of_turn_not_eos(chatml_model_dir):
    tok = load_tokenizer(chatml_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    enc = encode_example({"input": "a long text", "target": "short"}, CHAT, tok)
    completion = [t for t in enc["labels"] if t != -100]
    assert completion == tok("short", add_special_tokens=False)["input_ids"] + tok("<|im_end|>\n")["input_ids"]
    assert im_end in completion and tok.eos_token_id not in completion
    # A target cut to max_target_length keeps its end of turn.
    cut = encode_example({"input": "x", "target": "very " * 50}, CHAT.model_copy(update={"max_target_length": 6}), tok)
    assert [t for t in cut["labels"] if t != -100][-2:] == tok("<|im_end|>\n")["input_ids"]


def test_generation_stops_on_the_end_of_turn(chatml_model_dir):
    tok = load_tokenizer(chatml_model_dir)
    stops = stop_token_ids(tok, CHAT)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stops == [tok.eos_token_id, im_end] and end_of_turn(tok, CHAT) == "<|im_end|>\n"
    base = load_base(chatml_model_dir, ModelConfig(), QuantizationConfig(mode="none", compute_dtype="float32"))
    model = attach_lora(base, LoraConfig(r=16, alpha=32, dropout=0.0))
    answer = tok(" once upon a time", add_special_tokens=False)["input_ids"] + tok(end_of_turn(tok, CHAT))["input_ids"]
    prompts = [f"<|im_start|>user\nSummarize: text {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(8)]
    train_briefly(model, tok, prompts, answer)
    model.config.use_cache = True
    ids = [tok(p)["input_ids"] for p in prompts[:3]]
    ev = EvalConfig(max_new_tokens=12, batch_size=3)
    assert generate(model, tok, ids, ev, "stops", stops) == ["once upon a time"] * 3
    # Stopping on eos alone (what a single eos_token_id did) runs past the end of turn.
    assert all(len(text) > len("once upon a time") for text in generate(model, tok, ids, ev, "eos only"))
