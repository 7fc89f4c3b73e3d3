"""The **tokenize** stage: prompts + targets -> input_ids and labels with the prompt masked out.

Prompt and completion (target + the end of turn, `prompts.end_of_turn`) are tokenized separately, so
BPE never merges a token across the boundary, and concatenated; labels are -100 on every prompt
token, so the loss is on the completion only. Truncation cuts the *input text* inside the prompt,
never the instruction, the chat header or the target (the target is only cut to
`prompt.max_target_length`, keeping its end of turn).

Generation prompts (`prompt_ids`, validation and test) get the same budget on every row,
`max_length - max_target_length`: what the model is asked must not depend on the reference's length.

Output folder `<output_dir>/tokenize/<key>/`:
  dataset/    DatasetDict: train (input_ids, labels); validation and test (input_ids, labels, prompt_ids,
              references, input, target, cluster and the data stage's other text columns); unpadded.
  stats.json  per split: n, truncated, dropped, mean/max prompt and target tokens, label_tokens.
  info.json   n, truncated and dropped per split: what `run` returns, the Handle's info.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from loraflow.store.artifacts import Handle, content_digest, write_json
from loraflow.stages.prompts import IGNORE_INDEX
from loraflow.config import ModelConfig, PromptConfig
from loraflow.store.sources import resolve_model_dir
from loraflow.stages.prompts import PromptError, check_template, end_of_turn, render_prompt

log = logging.getLogger("loraflow")
# Files that decide how text becomes ids (a model folder's weights are deliberately not hashed).
TOKENIZER_GLOBS = ("tokenizer*.json", "*.model", "vocab*", "merges*", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
SPLITS = ("train", "validation", "test")
TRAIN_COLUMNS = ["input_ids", "labels"]
TEST_COLUMNS = ["input_ids", "labels", "prompt_ids", "references", "input", "target", "cluster"]


def load_tokenizer(tokenizer_dir: str | Path):
    """AutoTokenizer from a local folder, with pad = eos when the tokenizer has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so any id works; eos always exists
    return tokenizer


_HANDED_BACK: dict[tuple, Any] = {}  # (folder, its tokenizer files' digests) -> a tokenizer no caller uses now
_LENT: dict[int, tuple] = {}  # id of a tokenizer `take_tokenizer` gave out -> the key of the files it was taken for
_HANDED_BACK_LOCK = threading.Lock()


def _lending_key(tokenizer_dir: str | Path) -> tuple | None:
    try:
        return str(Path(tokenizer_dir).resolve()), tuple(sorted(tokenizer_digest(tokenizer_dir).items()))
    except FileNotFoundError:  # no tokenizer files here: loaded (or failing) as `load_tokenizer` does
        return None


def take_tokenizer(tokenizer_dir: str | Path):
    """`load_tokenizer(tokenizer_dir)`, or the tokenizer of the same folder and files that this process was handed
    back (`hand_back_tokenizer`): a cold run's pre-flight, tokenize and train stages, each in a thread of the one
    training process, load it once. A fast tokenizer is not safe in two threads at once, so each is lent to one
    caller at a time: a second caller while the first has it loads its own."""
    key = _lending_key(tokenizer_dir)
    with _HANDED_BACK_LOCK:
        tokenizer = _HANDED_BACK.pop(key, None) if key is not None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_dir)
    with _HANDED_BACK_LOCK:  # handed back under the files it was taken for, even if they change meanwhile
        if key is None:
            _LENT.pop(id(tokenizer), None)  # (an id can be reused once a tokenizer never handed back is freed)
        else:
            _LENT[id(tokenizer)] = key
    return tokenizer


def hand_back_tokenizer(tokenizer) -> None:
    """`tokenizer` (from `take_tokenizer`) is no longer used by its caller: the next one asking for the same folder
    and files may take it. One is kept per folder, for the last few folders."""
    with _HANDED_BACK_LOCK:
        key = _LENT.pop(id(tokenizer), None)
        if key is None:  # not lent (a folder without tokenizer files): nothing to keep
            return
        _HANDED_BACK.pop(key, None)
        _HANDED_BACK[key] = tokenizer
        while len(_HANDED_BACK) > 2:
            _HANDED_BACK.pop(next(iter(_HANDED_BACK)))


def tokenizer_digest(tokenizer_dir: str | Path) -> dict[str, str]:
    """{file name: sha256} of the tokenizer files in `tokenizer_dir` (a folder without any is an error)."""
    folder = Path(tokenizer_dir)
    files = {p for pattern in TOKENIZER_GLOBS for p in folder.glob(pattern) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, vocab/merges, *.model) in {folder}")
    return {p.name: content_digest(p) for p in sorted(files)}


def bos_prefix(tokenizer) -> list[int]:
    """Special ids the tokenizer itself puts before text (Llama: [BOS]; GPT-2, Qwen: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _with_bos(ids: list[int], prefix: list[int]) -> list[int]:
    # Add BOS only where the template/chat template did not write it (Llama-3's does, as text).
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def _prompt_ids(row: dict[str, Any], prompt: PromptConfig, tokenizer, prefix: list[int]) -> list[int]:
    return _with_bos(tokenizer(render_prompt(row, prompt, tokenizer), add_special_tokens=False)["input_ids"], prefix)


def _fit_prompt(row: dict[str, Any], prompt: PromptConfig, tokenizer, prefix: list[int], budget: int, n_ids: int):
    """Prompt ids within `budget` tokens, made by cutting row['input'] from its end; None if no input is left.

    Tokens are dropped from the input alone and the prompt is re-rendered, so the instruction and the
    assistant header survive. Decode + re-encode can shift a boundary by a token, hence the loop.
    """
    input_ids = tokenizer(row["input"], add_special_tokens=False)["input_ids"]
    keep = len(input_ids) - (n_ids - budget)
    while keep > 0:
        text = tokenizer.decode(input_ids[:keep], clean_up_tokenization_spaces=False)
        ids = _prompt_ids({**row, "input": text}, prompt, tokenizer, prefix)
        if len(ids) <= budget:
            return ids
        keep -= len(ids) - budget
    return None


def encode_batch(rows: dict[str, list], prompt: PromptConfig, tokenizer, prefix: list[int]) -> dict[str, list]:
    """Batched `encode_example` over a column dict (the shape `datasets.map(batched=True)` passes).

    Prompts and targets go through one batched (Rust, for fast tokenizers) call each; only the
    rare rows that are too long are re-tokenized one by one.
    """
    n = len(rows["input"])
    row_dicts = [{k: v[i] for k, v in rows.items()} for i in range(n)]
    prompts = [render_prompt(r, prompt, tokenizer) for r in row_dicts]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(list(rows["target"]), add_special_tokens=False)["input_ids"]
    stop = tokenizer(end_of_turn(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    keep = max(1, prompt.max_target_length - len(stop))  # target tokens kept: the end of turn always fits
    generation_budget = prompt.max_length - prompt.max_target_length  # the same for every row
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": [], "prompt_truncated": []}
    for row, p, t in zip(row_dicts, prompt_ids, target_ids):
        t = t[:keep] + stop
        p = _with_bos(p, prefix)
        budget = prompt.max_length - len(t)  # > 0: max_target_length < max_length is checked by the stage
        train_p = _fit_prompt(row, prompt, tokenizer, prefix, budget, len(p)) or [] if len(p) > budget else p
        gen_p = _fit_prompt(row, prompt, tokenizer, prefix, generation_budget, len(p)) or [] \
            if len(p) > generation_budget else p
        out["input_ids"].append(train_p + t if train_p else [])
        out["labels"].append([IGNORE_INDEX] * len(train_p) + t if train_p else [])
        out["prompt_ids"].append(gen_p)
        out["truncated"].append(len(p) > budget)
        out["prompt_truncated"].append(len(p) > generation_budget)
    return out


def encoder(data_format: str):
    """The batch encoder of a data format: `encode_batch` for columns, `chat.encode_conversations` for messages."""
    if data_format == "messages":  # conversations: the chat template renders them whole (loraflow.stages.chat)
        from loraflow.stages.chat import encode_conversations

        return encode_conversations
    return encode_batch


def encode_example(row: dict[str, Any], prompt: PromptConfig, tokenizer) -> dict[str, Any]:
    """{input_ids, labels, prompt_ids, truncated, prompt_truncated} for one row with `input` and `target`.

    labels = [-100] * prompt tokens + completion ids (ending with the end of turn); prompt_ids is the
    generation prompt, cut to `max_length - max_target_length` whatever the target. When even an input
    cut to nothing would not fit, the id lists are empty (the stage drops the row).
    """
    batch = encode_batch({k: [v] for k, v in row.items()}, prompt, tokenizer, bos_prefix(tokenizer))
    return {k: v[0] for k, v in batch.items()}


def run(data: Handle, prompt: PromptConfig, model: ModelConfig, out: Path, cache_dir: str | None = None) -> dict[str, Any]:
    """Tokenize the data stage's splits with `model`'s tokenizer (resolved only here, when the stage computes)
    into `out`; returns the summary (`info.json`): n, truncated and dropped per split."""
    if prompt.max_target_length >= prompt.max_length:
        raise PromptError(
            f"prompt.max_target_length ({prompt.max_target_length}) leaves no room for the prompt in "
            f"prompt.max_length ({prompt.max_length}): raise max_length or lower max_target_length"
        )
    local = Path(model.name_or_path).expanduser()  # a folder is read as it is (the model stage checks weights)
    tokenizer_dir = local.resolve() if local.is_dir() else resolve_model_dir(
        model.name_or_path, model.revision, cache_dir, model.allow_pickle_weights)
    tokenizer_digest(tokenizer_dir)  # a folder without tokenizer files fails here, naming them
    return _summary(_run(data, prompt, tokenizer_dir, out))


def _summary(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{field}_{split}": stats[split][field] for split in SPLITS for field in ("n", "truncated", "dropped")}


def _stats(prompt_lens: list[int], target_lens: list[int], truncated: int, dropped: int) -> dict[str, Any]:
    n = len(prompt_lens)
    return {
        "n": n,
        "truncated": truncated,  # kept rows whose input was cut
        "dropped": dropped,  # rows that did not fit even with the input cut to nothing
        "mean_prompt_tokens": round(sum(prompt_lens) / n, 1),
        "max_prompt_tokens": max(prompt_lens),
        "mean_target_tokens": round(sum(target_lens) / n, 1),
        "max_target_tokens": max(target_lens),
        "label_tokens": sum(target_lens),  # tokens the loss is computed on, per epoch
    }


class _Lengths:
    """Per row, as `encode` returns a batch: prompt and target (label) tokens, whether the input was cut, and whether
    the row fits. For training rows the prompt is the one trained on, fitted around the row's own target; for the
    others it is the generation prompt, one budget for every row."""

    def __init__(self, train: bool) -> None:
        self.train = train
        self.prompt: list[int] = []
        self.target: list[int] = []
        self.truncated: list[bool] = []
        self.fits: list[bool] = []

    def note(self, enc: dict[str, list]) -> dict[str, list]:
        target = [sum(1 for x in lab if x != IGNORE_INDEX) for lab in enc["labels"]]
        self.target += target
        if self.train:
            self.prompt += [len(lab) - n for lab, n in zip(enc["labels"], target)]
            fits, truncated = enc["input_ids"], enc["truncated"]
        else:
            self.prompt += [len(p) for p in enc["prompt_ids"]]
            fits, truncated = enc["prompt_ids"], enc["prompt_truncated"]
        self.truncated += truncated
        self.fits += [bool(ids) and bool(full) for ids, full in zip(fits, enc["input_ids"])]
        return enc


def _run(data: Handle, prompt: PromptConfig, tokenizer_dir: Path, out: Path) -> dict[str, dict[str, Any]]:
    tokenizer = take_tokenizer(tokenizer_dir)
    try:
        return _encode_splits(data, prompt, tokenizer, out)
    finally:
        hand_back_tokenizer(tokenizer)


def _encode_splits(data: Handle, prompt: PromptConfig, tokenizer, out: Path) -> dict[str, dict[str, Any]]:
    import datasets

    prefix = bos_prefix(tokenizer)
    splits = datasets.load_from_disk(str(Path(data.path) / "dataset"))
    encode = encoder(data.info.get("format", "columns"))
    if encode is encode_batch:
        check_template(prompt.template, splits["train"].column_names)
    if prompt.system and prompt.style == "template":
        log.warning("tokenize: prompt.system is ignored with prompt.style=template; put it in prompt.template")
    splits_out, stats = {}, {}
    for name in SPLITS:
        ds = splits[name]
        if len(ds) == 0:
            raise ValueError(f"the data stage's {name} split is empty: check data.max_{name}_samples and the source")
        # keep_in_memory: never write cache files into the data stage's folder. new_fingerprint: skip
        # datasets' hashing of the closure, which pickles the whole tokenizer (seconds per call).
        # Each row's lengths are taken from the batch as it is encoded: reading the columns back out of Arrow
        # afterwards costs as much again as the encoding on the way to the first step.
        facts = _Lengths(train=name == "train")
        started = time.perf_counter()
        enc = ds.map(lambda rows: facts.note(encode(rows, prompt, tokenizer, prefix)), batched=True, batch_size=1000,
                     keep_in_memory=True, new_fingerprint=f"{uuid.uuid4().hex}-{name}", desc=f"tokenize {name}")
        seconds = time.perf_counter() - started
        if len(facts.fits) != len(ds):  # datasets called the function on more (or fewer) rows than the split has
            raise RuntimeError(f"tokenize: {len(facts.fits)} rows encoded for the {len(ds)} of {name}; this is a bug, "
                               "please report it with your datasets version")
        prompt_lens, target_lens, truncated = facts.prompt, facts.target, facts.truncated
        kept = [i for i, fits in enumerate(facts.fits) if fits]
        if not kept:
            raise PromptError(_nothing_fits(ds[0], prompt, tokenizer, prefix, name, len(ds)) if encode is encode_batch
                              else f"tokenize: none of the {len(ds)} {name} conversations fits prompt.max_length="
                              f"{prompt.max_length} even with its earlier turns dropped: raise prompt.max_length")
        unlabelled = [i for i in kept if target_lens[i] == 0]
        if unlabelled:  # their loss would be 0 and silently dilute the others'
            raise PromptError(f"tokenize: {len(unlabelled)} {name} examples have no trainable label token (first rows: "
                              f"{', '.join(map(str, unlabelled[:5]))}): check their targets, or raise prompt.max_length")
        stats[name] = _stats([prompt_lens[i] for i in kept], [target_lens[i] for i in kept],
                             sum(truncated[i] for i in kept), len(ds) - len(kept))
        stats[name]["examples_per_second"] = round(len(ds) / seconds, 1)
        if len(kept) < len(ds):
            enc = enc.select(kept, keep_in_memory=True)
            log.warning("tokenize: dropped %d of %d %s examples that do not fit prompt.max_length=%d even with "
                        "their input cut to nothing", len(ds) - len(kept), len(ds), name, prompt.max_length)
        log.info("tokenize: %s: %d examples, %d with the input cut to fit prompt.max_length=%d",
                 name, stats[name]["n"], stats[name]["truncated"], prompt.max_length)
        extra = [c for c in ds.column_names if c not in TEST_COLUMNS]  # e.g. aspect, id: to trace predictions
        splits_out[name] = enc.select_columns(TRAIN_COLUMNS if name == "train" else TEST_COLUMNS + extra)
    datasets.DatasetDict(splits_out).save_to_disk(str(out / "dataset"))
    write_json(out / "stats.json", stats)
    return stats


def _nothing_fits(row: dict[str, Any], prompt: PromptConfig, tokenizer, prefix: list[int], split: str, n: int) -> str:
    """One line: how many tokens the template alone needs, and what to change."""
    overhead = len(_prompt_ids({**row, "input": ""}, prompt, tokenizer, prefix))
    return (
        f"tokenize: none of the {n} {split} examples fits prompt.max_length={prompt.max_length}: the prompt without "
        f"its input already takes {overhead} tokens, plus up to prompt.max_target_length={prompt.max_target_length} "
        "for the target; raise prompt.max_length, or shorten prompt.template/prompt.system or prompt.max_target_length"
    )
