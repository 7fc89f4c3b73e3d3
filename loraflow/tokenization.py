"""The **tokenize** stage: prompts + targets -> input_ids and labels with the prompt masked out.

Prompt and completion are tokenized separately (so BPE never merges across the boundary) and
concatenated; labels are -100 on every prompt token, so the loss is on the completion only.
Truncation cuts the *input text* inside the prompt, never the instruction, the chat header or the
target.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loraflow.artifacts import Handle, atomic_dir, file_digest, fingerprint, is_complete, stage_dir, write_json
from loraflow.collator import IGNORE_INDEX
from loraflow.config import PromptConfig, section_dict
from loraflow.prompts import PromptError, check_template, leading_special_ids, render_prompt

log = logging.getLogger("loraflow")
CODE_VERSION = "tokenize-1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _prompt_ids(row: dict[str, Any], prompt: PromptConfig, tokenizer, prefix: list[int]) -> list[int]:
    text = render_prompt(row, prompt, tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prompt.style == "template" and prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


def encode_example(row: dict[str, Any], prompt: PromptConfig, tokenizer, prefix: list[int] | None = None) -> dict[str, Any]:
    """input_ids/labels/prompt_ids for one example; `truncated` says whether the input was cut.

    Returns `prompt_ids=[]` when not even an empty input fits (the caller drops such rows).
    """
    prefix = leading_special_ids(tokenizer) if prefix is None else prefix
    target = tokenizer(row["target"], add_special_tokens=False)["input_ids"][: prompt.max_target_length - 1]
    target = target + [tokenizer.eos_token_id]  # the model must learn to stop
    budget = prompt.max_length - len(target)
    ids = _prompt_ids(row, prompt, tokenizer, prefix)
    truncated = False
    if len(ids) > budget:
        truncated = True
        input_ids = tokenizer(row["input"], add_special_tokens=False)["input_ids"]
        keep = len(input_ids) - (len(ids) - budget)
        # Decoding and re-encoding can shift token boundaries by a few tokens: shrink until it fits.
        for _ in range(8):
            if keep <= 0:
                return {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": True}
            ids = _prompt_ids({**row, "input": tokenizer.decode(input_ids[:keep])}, prompt, tokenizer, prefix)
            if len(ids) <= budget:
                break
            keep -= max(1, len(ids) - budget)
        else:
            return {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": True}
    return {
        "input_ids": ids + target,
        "labels": [IGNORE_INDEX] * len(ids) + target,
        "prompt_ids": ids,
        "truncated": truncated,
    }


def _stats(ds) -> dict[str, Any]:
    prompt_lens = [len(p) for p in ds["prompt_ids"]]
    target_lens = [len(i) - len(p) for i, p in zip(ds["input_ids"], ds["prompt_ids"])]
    n = len(prompt_lens)
    return {
        "n": n,
        "truncated": int(sum(ds["truncated"])),
        "mean_prompt_tokens": round(sum(prompt_lens) / n, 1),
        "max_prompt_tokens": max(prompt_lens),
        "mean_target_tokens": round(sum(target_lens) / n, 1),
        "max_target_tokens": max(target_lens),
        "label_tokens": int(sum(target_lens)),
    }


def tokenize_data(data: Handle, prompt: PromptConfig, tokenizer_dir: str | Path, output_dir: str | Path) -> Handle:
    """Tokenize both splits of the data stage's dataset; saves Arrow + stats.json."""
    tokenizer_dir = Path(tokenizer_dir)
    tok_digest = fingerprint([file_digest(tokenizer_dir / f) for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()])
    key = fingerprint(data.fingerprint, section_dict(prompt), tok_digest, CODE_VERSION)
    final = stage_dir(output_dir, "tokenize", key)
    if not is_complete(final):
        _run(data, prompt, tokenizer_dir, final)
    stats = json.loads((final / "stats.json").read_text())
    return Handle(stage="tokenize", path=str(final), fingerprint=key, info=stats)


def _run(data: Handle, prompt: PromptConfig, tokenizer_dir: Path, final: Path) -> None:
    import datasets

    tokenizer = load_tokenizer(tokenizer_dir)
    prefix = leading_special_ids(tokenizer)
    splits = datasets.load_from_disk(str(Path(data.path) / "dataset"))
    check_template(prompt.template, splits["train"].column_names)
    out, stats = {}, {}
    for name in ("train", "test"):
        ds = splits[name].map(lambda row: encode_example(row, prompt, tokenizer, prefix), desc=f"tokenize {name}")
        before = len(ds)
        ds = ds.filter(lambda row: len(row["prompt_ids"]) > 0)
        if len(ds) == 0:
            raise PromptError(
                f"tokenize: no {name} example fits in prompt.max_length={prompt.max_length} even with its input "
                "cut to nothing: raise prompt.max_length or shorten prompt.template / prompt.max_target_length"
            )
        keep = ["input_ids", "labels"] if name == "train" else ["input_ids", "labels", "prompt_ids", "references", "input", "target"]
        stats[name] = {**_stats(ds), "dropped_too_long": before - len(ds)}
        out[name] = ds.select_columns(keep)
        if stats[name]["truncated"]:
            log.info("tokenize: %d of %d %s examples had their input cut to fit max_length=%d",
                     stats[name]["truncated"], before, name, prompt.max_length)
    with atomic_dir(final, {"stage": "tokenize"}) as tmp:
        datasets.DatasetDict(out).save_to_disk(str(tmp / "dataset"))
        write_json(tmp / "stats.json", stats)
