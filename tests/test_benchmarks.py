"""The benchmark's FLOP count agrees with torch's own FLOP counter on a real model."""

import torch

from benchmarks.flops import model_shape, training_flops
from loraflow.collator import CompletionCollator
from loraflow.trainer import body_and_head


def test_analytic_forward_flops_match_torch_flop_counter(tiny_llama_dir):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    batch = CompletionCollator(pad_token_id=0)([
        {"input_ids": list(range(10, 40)), "labels": [-100] * 25 + list(range(35, 40))},
        {"input_ids": list(range(10, 30)), "labels": [-100] * 12 + list(range(22, 30))},
    ])
    rows, length = batch["input_ids"].shape
    shape = model_shape(tiny_llama_dir)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    expected = training_flops(shape, rows * length, rows * length, rows * length**2, lora_rank=0) / 2
    assert abs(counter.get_total_flops() - expected) / expected < 0.01

    body, head = body_and_head(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        head(hidden[:, :-1][batch["labels"][:, 1:] != -100])
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    expected = training_flops(shape, rows * length, n_labels, rows * length**2, lora_rank=0) / 2
    assert abs(counter.get_total_flops() - expected) / expected < 0.01
