"""Greedy (or sampled) generation for token-id prompts, batched: what evaluation scores, what the parity
check compares, and what in-training evaluation generates. Prompts are sorted by length and left-padded,
so a batch wastes little and every completion starts where its prompt ends; results come back in the
input order.
"""

from __future__ import annotations

from typing import Any

from loraflow.config import EvalConfig


def generate(model, tokenizer, prompts: list[list[int]], ev: EvalConfig, desc: str,
             stop_ids: list[int] | None = None) -> list[str]:
    """Decode completions for token-id prompts, returned in the input order; stop on any of `stop_ids`
    (default: the tokenizer's eos)."""
    import torch
    from tqdm.auto import tqdm


    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=ev.max_new_tokens,
        do_sample=ev.do_sample,
        num_beams=ev.num_beams,
        repetition_penalty=ev.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
        use_cache=True,
    )
    if ev.do_sample:
        gen_kwargs.update(temperature=ev.temperature, top_p=ev.top_p)
    else:  # silence "generation flags are not valid" warnings from the model's sampling defaults
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    batches = [order[i : i + ev.batch_size] for i in range(0, len(order), ev.batch_size)]
    with torch.inference_mode():
        for idx in tqdm(batches, desc=desc, unit="batch"):
            # left padding: every prompt ends at the last column, where generation appends
            batch = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding_side="left", return_tensors="pt")
            input_ids = batch["input_ids"]
            new = model.generate(
                input_ids=input_ids.to(device), attention_mask=batch["attention_mask"].to(device), **gen_kwargs
            )[:, input_ids.shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
    return out
