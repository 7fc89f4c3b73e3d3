"""Pre-flight: what a run will meet, checked before any weight loads.

`loraflow validate` prints it; the flow runs the same checks as its first task (`preflight`), so a run
that cannot work fails in seconds, before a stage writes anything. Checked:
- the data: source, columns, target types, splits and their sizes after the caps and the split policy
  (the data stage's own code, into a scratch folder);
- the model: its folder (or hub files) with config and tokenizer, no weights;
- the prompt: the template's placeholders are columns, the end of turn the model learns to stop on;
- on a sample of the training rows: token lengths of prompts and targets (histograms), inputs cut to fit
  `prompt.max_length`, targets cut by `prompt.max_target_length`, rows with no trainable label, every
  completion ending in the end of turn, and the chat template's consistency (the prompt it renders is a
  prefix of the conversation with the answer, as text and as tokens).
Errors fail the run; warnings are printed and kept in the report.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

from loraflow.config import PipelineConfig

ERROR, WARNING, OK = "error", "warning", "ok"
SAMPLE_ROWS = 2000  # training rows tokenized for the length checks (all of them when there are fewer)


@dataclass
class Report:
    """The checks' results, in order: (level, text) lines and the histograms."""

    checked_as: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    histograms: dict[str, list[str]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # the numbers behind the lines, e.g. memory estimates

    def add(self, level: str, text: str) -> None:
        self.lines.append((level, text))

    @property
    def errors(self) -> list[str]:
        return [t for level, t in self.lines if level == ERROR]

    @property
    def warnings(self) -> list[str]:
        return [t for level, t in self.lines if level == WARNING]

    def summary(self) -> str:
        e, w = len(self.errors), len(self.warnings)
        return f"{e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)}"

    def text(self) -> str:
        out = [f"pre-flight of {self.checked_as}"]
        out += [f"{level:<8} {text}" for level, text in self.lines]
        for title, rows in self.histograms.items():
            out += [f"{title}:"] + [f"  {r}" for r in rows]
        return "\n".join(out + [f"result: {self.summary()}"])

    def markdown(self) -> str:
        out = [f"# Pre-flight: {self.summary()}", "", f"Checked as: `{self.checked_as}`", "",
               "| check | result |", "|---|---|"]
        out += [f"| {level} | {text.replace('|', '/')} |" for level, text in self.lines]
        for title, rows in self.histograms.items():
            out += ["", f"**{title}**", "", "```", *rows, "```"]
        return "\n".join(out)


def histogram(values: list[int], bins: int = 8, width: int = 30) -> list[str]:
    """A compact text histogram: one line per bin, 'lo-hi  bar  count'."""
    if not values:
        return ["(none)"]
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts: dict[int, int] = {}
    for v in values:
        counts[(v - lo) // step] = counts.get((v - lo) // step, 0) + 1
    top = max(counts.values())
    edge = len(str(hi))
    return [f"{lo + b * step:>{edge}}-{min(hi, lo + (b + 1) * step - 1):<{edge}} "
            f"{'#' * max(1, round(width * counts.get(b, 0) / top)) if counts.get(b) else '':<{width}} {counts.get(b, 0)}"
            for b in range((hi - lo) // step + 1)]


def run_checks(cfg: PipelineConfig, checked_as: str, sample: int = SAMPLE_ROWS, probe: bool = False,
               data_ahead: str | None = None) -> Report:
    """Every check that needs no weights (and, with `probe`, one real training step); stops early where a later
    check has nothing to read. `cfg` as given by `loraflow validate`, or the run's, already resolved. `data_ahead`:
    the folder the flow builds the splits in while this runs (`data.reserve_ahead`): read when they are ready."""
    from loraflow.hardware import resolve

    cfg = resolve(cfg)
    report = Report(checked_as)
    with tempfile.TemporaryDirectory(prefix="loraflow-preflight-") as scratch:
        splits = _data(cfg, report, scratch, data_ahead)
        model = _model(cfg, report)
        if splits is None or model is None:
            return report
        from loraflow.stages.tokenize import hand_back_tokenizer

        tokenizer, config, folder = model
        try:
            if not _prompt(cfg, report, splits["train"].column_names, tokenizer):
                return report
            batch = _sample(cfg, report, splits, tokenizer, sample)
            if batch is not None:
                _memory(cfg, report, config, batch)
                if probe and not report.errors:
                    _probe(cfg, report, folder, tokenizer, batch, len(splits["train"]))
        finally:
            hand_back_tokenizer(tokenizer)  # the run's tokenize and train stages take it
    return report


def _data(cfg: PipelineConfig, report: Report, scratch: str, ahead: str | None = None):
    from loraflow.stages.data import DataError, build_splits, splits_ahead

    try:
        splits, dropped, origin = splits_ahead(cfg.data, ahead) or build_splits(cfg.data, scratch)
    except DataError as err:
        report.add(ERROR, str(err))
        return None
    sizes = " / ".join(f"{len(splits[s])} {s}" for s in ("train", "validation", "test"))
    report.add(OK, f"data: {sizes} rows from '{cfg.data.source}' (test: {origin['test']}; validation: {origin['validation']})")
    if dropped:
        report.add(WARNING, f"data: {dropped} rows have an empty input or target and are dropped")
    return splits


def _model(cfg: PipelineConfig, report: Report):
    from loraflow.store.sources import ModelSourceError, metadata_dir
    from loraflow.stages.tokenize import take_tokenizer, tokenizer_digest

    m = cfg.model
    try:
        folder = metadata_dir(m.name_or_path, m.revision, cfg.run.cache_dir, m.allow_pickle_weights)
        tokenizer_digest(folder)
    except (ModelSourceError, FileNotFoundError) as err:
        report.add(ERROR, str(err))
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=m.trust_remote_code)
        tokenizer = take_tokenizer(folder)
    except Exception as err:  # noqa: BLE001 - whatever transformers raises for an unusable folder
        report.add(ERROR, f"model.name_or_path: '{m.name_or_path}' has a config or tokenizer transformers cannot load "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}): pass a model "
                          "folder saved with save_pretrained, a .gguf file or a hub id")
        return None
    report.add(OK, f"model: {m.name_or_path} ({config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers), "
                   f"tokenizer with {len(tokenizer)} tokens, chat template {'present' if tokenizer.chat_template else 'absent'}")
    return tokenizer, config, folder


def _prompt(cfg: PipelineConfig, report: Report, columns: list[str], tokenizer) -> bool:
    from loraflow.stages.prompts import PromptError, check_template, end_of_turn, template_fields

    if cfg.data.format == "messages":
        if not tokenizer.chat_template:
            report.add(ERROR, f"data.format=messages needs a chat template, and the tokenizer of "
                              f"'{cfg.model.name_or_path}' has none: use a chat model's tokenizer")
            return False
        report.add(OK, f"prompt: conversations rendered whole by the chat template, the loss on "
                       f"{cfg.prompt.train_on.replace('_', ' ')} turns; they end with {end_of_turn(tokenizer, cfg.prompt)!r}")
        return True
    try:
        check_template(cfg.prompt.template, columns)
        stop = end_of_turn(tokenizer, cfg.prompt)
    except PromptError as err:
        report.add(ERROR, _not_text(cfg, set(template_fields(cfg.prompt.template)) - set(columns)) or str(err))
        return False
    if cfg.prompt.system and cfg.prompt.style == "template":
        report.add(WARNING, "prompt.system is ignored with prompt.style=template: put it in prompt.template")
    fields = ", ".join("{" + f + "}" for f in sorted(template_fields(cfg.prompt.template))) or "no columns"
    report.add(OK, f"prompt: style {cfg.prompt.style}, template reads {fields}; completions end with {stop!r}")
    return True


def _not_text(cfg: PipelineConfig, missing: set[str]) -> str | None:
    """The error for a placeholder naming a source column the data stage does not keep (lists, numbers, ...)."""
    from loraflow.stages.data import load_source

    if not missing or cfg.data.source == "aclsum":
        return None
    with tempfile.TemporaryDirectory(prefix="loraflow-preflight-") as scratch:
        source = load_source(cfg.data, scratch)
        features = next(iter(source.values())).features
        name = next((m for m in sorted(missing) if m in features), None)
        if name is None:
            return None
        return (f"prompt.template uses {{{name}}}, a column of {features[name]}, not text: a template fills in text "
                f"columns only: store it as text, or make it the input (data.input_column={name}; lists of strings "
                "are joined by data.join_input_lists)")


def _sample(cfg: PipelineConfig, report: Report, splits, tokenizer, sample: int) -> list[dict] | None:
    """The sampled rows' checks; returns them tokenized (None when they cannot be)."""
    from loraflow.stages.prompts import IGNORE_INDEX
    from loraflow.stages.prompts import PromptError, end_of_turn, render_prompt
    from loraflow.stages.tokenize import bos_prefix, encoder

    encode_batch = encoder(cfg.data.format)
    prompt = cfg.prompt
    train = splits["train"]
    rows = train.shuffle(seed=cfg.data.seed).select(range(min(sample, len(train)))) if len(train) > sample else train
    columns = rows.to_dict()
    prefix = bos_prefix(tokenizer)
    try:
        enc = encode_batch(columns, prompt, tokenizer, prefix)
        test = splits["test"].to_dict()
        test_enc = encode_batch(test, prompt, tokenizer, prefix)
    except PromptError as err:
        report.add(ERROR, str(err))
        return None
    n = len(rows)
    stop = tokenizer(end_of_turn(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    ids = rows["id"] if "id" in rows.column_names else [str(i) for i in range(n)]
    unfit = [i for i, x in enumerate(enc["input_ids"]) if not x]
    no_labels = [i for i, lab in enumerate(enc["labels"]) if lab and all(x == IGNORE_INDEX for x in lab)]
    if no_labels:
        report.add(ERROR, f"tokenize: {len(no_labels)} of {n} sampled training rows have no trainable label token "
                          f"(first: {', '.join(map(str, (ids[i] for i in no_labels[:5])))}): their loss would be 0; "
                          "raise prompt.max_length or fix those targets")
    if len(unfit) == n:
        report.add(ERROR, f"tokenize: none of the {n} sampled training rows fits prompt.max_length={prompt.max_length} "
                          "even with its input cut to nothing: raise prompt.max_length or shorten the template")
        return None
    if unfit:
        report.add(WARNING, f"tokenize: {len(unfit)} of {n} sampled training rows do not fit prompt.max_length="
                            f"{prompt.max_length} even with the input cut to nothing and will be dropped "
                            f"(first: {', '.join(map(str, (ids[i] for i in unfit[:5])))})")
    unfit_set = set(unfit)
    kept = [i for i in range(n) if i not in unfit_set]
    share = lambda k: f"{k} of {n} ({100 * k / n:.1f}%)"  # noqa: E731
    cut_inputs = sum(bool(enc["truncated"][i]) for i in kept)
    target_ids = tokenizer(list(columns["target"]), add_special_tokens=False)["input_ids"]
    keep = max(1, prompt.max_target_length - len(stop))
    cut_targets = sum(len(target_ids[i]) > keep for i in kept)
    level = lambda k: WARNING if k else OK  # noqa: E731
    report.add(level(cut_inputs), f"tokenize: {share(cut_inputs)} sampled training inputs are cut to fit "
                                  f"prompt.max_length={prompt.max_length}")
    report.add(level(cut_targets), f"tokenize: {share(cut_targets)} sampled targets are cut by "
                                   f"prompt.max_target_length={prompt.max_target_length} (raise it to keep them whole)")
    budget, n_test = prompt.max_length - prompt.max_target_length, len(test_enc["prompt_ids"])
    test_unfit = sum(not x for x in test_enc["prompt_ids"])
    test_cut = sum(bool(x) and bool(c) for x, c in zip(test_enc["prompt_ids"], test_enc["prompt_truncated"]))
    if test_unfit == n_test:
        report.add(ERROR, f"tokenize: none of the {n_test} test prompts fits prompt.max_length - max_target_length = "
                          f"{budget} tokens even with its input cut to nothing: raise prompt.max_length or lower "
                          "prompt.max_target_length")
    elif test_unfit:
        report.add(WARNING, f"tokenize: {test_unfit} of {n_test} test prompts do not fit {budget} tokens even with the "
                            "input cut to nothing and will not be scored")
    report.add(level(test_cut), f"tokenize: {test_cut} of {n_test} test prompts are cut to prompt.max_length - "
                                f"max_target_length = {budget}")
    unstopped = [i for i in kept if enc["input_ids"][i][-len(stop):] != stop]
    if unstopped:
        report.add(ERROR, f"tokenize: {len(unstopped)} completions do not end with the end of turn {stop}: the model "
                          "would not learn to stop; this is a bug, please report it")
    if prompt.style == "chat":
        _chat_consistency(report, _prompt_and_full(cfg, [{k: v[i] for k, v in columns.items()} for i in kept[:200]],
                                                   tokenizer, render_prompt), tokenizer)
    label_lens = [sum(1 for x in enc["labels"][i] if x != IGNORE_INDEX) for i in kept]
    report.histograms[f"prompt tokens, {len(kept)} sampled training rows"] = histogram(
        [len(enc["input_ids"][i]) - k for i, k in zip(kept, label_lens)])
    report.histograms[f"target tokens with the end of turn, {len(kept)} sampled training rows"] = histogram(label_lens)
    return [{"input_ids": enc["input_ids"][i], "labels": enc["labels"][i]} for i in kept]


def _prompt_and_full(cfg: PipelineConfig, rows: list[dict[str, Any]], tokenizer, render_prompt) -> list[tuple[str, str]]:
    """(the generation prompt, the conversation with its answer) as the chat template renders them, per row."""
    import json

    from loraflow.stages.chat import with_system

    prompt, pairs = cfg.prompt, []
    for row in rows:
        if cfg.data.format == "messages":
            messages = with_system(json.loads(row["messages"]), prompt)
            before = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        else:
            before = render_prompt(row, prompt, tokenizer)
            messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
                {"role": "user", "content": prompt.template.format_map(row)}, {"role": "assistant", "content": row["target"]}]
        pairs.append((before, tokenizer.apply_chat_template(messages, tokenize=False)))
    return pairs


def _chat_consistency(report: Report, pairs: list[tuple[str, str]], tokenizer) -> None:
    """The conversation with its answer must begin with the prompt rendered for generation, as text and as tokens:
    a template that rewrites history (drops a system prompt, strips reasoning) trains on another prompt, and a
    token merged across the boundary makes generation start from other ids than training saw."""
    same_text = [(before, full) for before, full in pairs if full.startswith(before)]
    text_diff = len(pairs) - len(same_text)
    token_diff = 0
    if same_text:  # two batched calls (Rust, for fast tokenizers), not two per row
        befores = tokenizer([b for b, _ in same_text], add_special_tokens=False)["input_ids"]
        fulls = tokenizer([f for _, f in same_text], add_special_tokens=False)["input_ids"]
        token_diff = sum(full[:len(ids)] != ids for ids, full in zip(befores, fulls))
    n = len(pairs)
    if text_diff:
        report.add(WARNING, f"prompt: for {text_diff} of {n} rows the chat template renders the conversation before "
                            "the answer differently once the answer is added (it rewrites history): training sees another "
                            "prompt than evaluation asks")
    if token_diff:
        report.add(WARNING, f"prompt: for {token_diff} of {n} rows the tokens at the prompt/answer boundary merge "
                            "differently in the full conversation than in the prompt alone")
    if not (text_diff or token_diff):
        report.add(OK, f"prompt: the chat template's prompt is a prefix of the full conversation, as text and as "
                       f"tokens ({n} rows)")


def _memory(cfg: PipelineConfig, report: Report, config, rows: list[dict]) -> None:
    """Training and evaluation memory against what is free here, with the fix when over."""
    from loraflow.stages import memory
    from loraflow.stages.prompts import IGNORE_INDEX

    cuda = memory.cuda_visible()
    try:
        shapes = memory.shapes(config)
    except Exception as err:  # noqa: BLE001 - an architecture transformers cannot build: no estimate, no failure
        report.add(WARNING, f"memory: no estimate for this architecture ({type(err).__name__})")
        return
    budget, where = memory.available(cuda)
    batch = cfg.train.per_device_train_batch_size
    length = max(len(r["input_ids"]) for r in rows)
    labels = batch * max(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    plain = memory.Estimate(memory.training(cfg, shapes, batch, length, labels, cuda, False), budget, where)
    saved = memory.Estimate(memory.training(cfg, shapes, batch, length, labels, cuda, True), budget, where)
    report.facts.update(train_bytes=plain.total, train_checkpointed_bytes=saved.total, budget_bytes=budget)
    setting = cfg.train.gradient_checkpointing
    on = memory.checkpointing(setting, cuda, lambda: plain)
    need = saved if on else plain
    what = f"memory: train, batch {batch} x {length} tokens, gradient checkpointing {'on' if on else 'off'} ({setting})"
    if need.total <= budget:
        report.add(OK, need.line(what))
    elif not on:
        report.add(ERROR, need.line(what) + ": set train.gradient_checkpointing=auto (or true)"
                   + (f", which needs ~{saved.total / memory.GIB:.1f} GiB" if saved.total <= budget else
                      ", lower train.per_device_train_batch_size or prompt.max_length"))
    else:
        report.add(ERROR, need.line(what) + ": lower train.per_device_train_batch_size (raise "
                   "train.gradient_accumulation_steps to keep the effective batch) or prompt.max_length")
    generation = memory.Estimate(memory.evaluation(cfg, shapes, cfg.prompt.max_length - cfg.prompt.max_target_length, cuda),
                                 budget, where)
    if generation.total <= budget:
        report.add(OK, generation.line(f"memory: evaluate, batch {cfg.eval.batch_size}"))
    else:
        report.add(ERROR, generation.line(f"memory: evaluate, batch {cfg.eval.batch_size}") + ": lower eval.batch_size")


def _probe(cfg: PipelineConfig, report: Report, folder, tokenizer, rows: list[dict], n_train: int) -> None:
    """One real training step on the two longest sampled rows (after an untimed one), scaled to the configured
    batch and length: seconds per step and the whole training's time."""
    import math
    import resource
    import time

    import torch
    from peft import get_peft_model

    from loraflow.stages.train.collators import CompletionCollator
    from loraflow.stages.model import load_base, peft_config, prepare_for_training
    from loraflow.stages.train.trainer import body_and_head, label_only_loss

    two = sorted(rows, key=lambda r: len(r["input_ids"]))[-2:]
    base = load_base(folder, cfg.model, cfg.quantization, training=True, cache_dir=cfg.run.cache_dir)
    base = prepare_for_training(base, cfg.quantization, cfg.train.gradient_checkpointing is True,
                                cfg.train.upcast_frozen)
    torch.manual_seed(cfg.lora.seed)
    model = get_peft_model(base, peft_config(cfg.lora))
    model.train()
    device = next(p.device for p in model.parameters())
    inputs = {k: v.to(device) for k, v in CompletionCollator(pad_token_id=tokenizer.pad_token_id)(two).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate)
    parts = body_and_head(model) if cfg.train.label_only_logits else None

    def step() -> float:
        started = time.perf_counter()
        loss = label_only_loss(*parts, inputs)[0] if parts else model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()  # warm-up: allocations, kernels
    seconds = step()
    tokens = sum(len(r["input_ids"]) for r in two)
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    per_step = seconds * batch * mean / tokens  # time grows about linearly with the tokens of a step
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.num_train_epochs * n_train / batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    report.add(OK, f"probe: one step of 2 rows ({tokens} tokens) took {seconds:.2f} s; ~{per_step:.1f} s per step of "
                   f"{batch} rows of ~{mean:.0f} tokens, ~{per_step * steps / 60:.1f} min for {steps} steps "
                   f"(this process peaked at {peak:.1f} GiB)")
