"""Each speed lever on its own, on the same batches of the same model: what it buys, measured here.

    uv run python -m benchmarks.levers                 # SciTLDR, ~10 min on 2 CPU cores

Training: seconds per optimizer step (forward + backward, LoRA on an NF4 SmolLM2-135M) for the same
examples, from the plain script's layout (pad to 512, logits everywhere) to loraflow's default: the
median over `--rounds` rounds of `--steps` timed steps each, every case's round opening with an untimed
warm-up step, and the cases' order rotated each round (no case always runs first, on a cold cache).
Evaluation: examples/s of greedy generation on the same prompts, from one `generate` per example on
the 4-bit model to loraflow's default (batched, dequantized, adapter beside the weights) and the merged
adapter (`eval.merge: true`); outputs are compared. `--parts eval` measures one table and keeps the others.
Tokenization: examples/s of one call per example vs batched calls of the fast tokenizer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

from benchmarks.data import INSTRUCTIONS, REPO, write_examples


def _load(model_dir: str, dequantize: bool = False, upcast: bool = True, checkpointing: bool = False,
          dropout: float = 0.0, selective: bool = False):
    """SmolLM2 in NF4 with LoRA r16 all-linear, in this machine's compute dtype. `upcast`: peft's
    prepare_model_for_kbit_training (frozen non-4-bit weights to fp32), else they stay in the compute dtype
    (loraflow's train.upcast_frozen=auto in bf16). `dequantize`: the base dequantized to the compute dtype,
    no adapter (for evaluation: merged into it afterwards). `checkpointing`: activation checkpointing on, as
    loraflow turns it on (`loraflow.stages.model.enable_checkpointing`: non-reentrant), in training mode;
    `selective`: keeping the base's matmul and attention outputs (`_selective_context`).
    `dropout`: the LoRA dropout (peft's `nn.Dropout`)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraflow.stages.model import compute_dtype, set_cpu_4bit_kernel

    dtype = compute_dtype("auto")  # loraflow's rule for this machine, as in the pipeline
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant)
    set_cpu_4bit_kernel(model, allowed=False)  # as loraflow's training model (see loraflow.stages.model)
    model.config.use_cache = False
    if dequantize:
        return model.dequantize()
    if upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        from loraflow.stages.model import enable_checkpointing

        # respect_saved_tensors_hooks: what selective keeps is counted by `saved_for_backward_mb` like any saved tensor
        enable_checkpointing(model, **({"context_fn": _selective_context(dtype), "respect_saved_tensors_hooks": True}
                                       if selective else {}))
        return _with_lora(model, dropout).train()  # checkpointing (and dropout) act in training mode only
    return _with_lora(model, dropout)


def _with_lora(model, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def _selective_context(dtype):
    """The `context_fn` that makes non-reentrant checkpointing selective (torch's
    `create_selective_checkpoint_contexts`): each layer keeps the outputs of its matmuls in `dtype` (the frozen
    base's; the fp32 LoRA path is recomputed) and of the fused attention, and recomputes the rest (norms, rotary,
    activations, the LoRA path and its dropout).
    Checked once (2-layer Llama, bf16, LoRA dropout 0.2): the gradients of full checkpointing bit for bit, with 14
    fewer bf16 matmuls in the backward."""
    import functools

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    attention = {getattr(aten, name).default for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention") if hasattr(aten, name)}

    def policy(ctx, func, *args, **kwargs):
        keep = func in attention or (func in (aten.mm.default, aten.addmm.default) and args[-1].dtype == dtype)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


PARTIAL = 8  # layers left unchecked in the partial-checkpointing row


def _checkpoint_all_but(model, last: int) -> int:
    """Leave the last `last` decoder layers of a checkpointed model unchecked (their activations kept for the
    backward, no recomputation); returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers[len(layers) - last:]:
        layer.gradient_checkpointing = False
    return min(last, len(layers))


def saved_for_backward_mb(step) -> float:
    """MB of distinct tensor storage autograd keeps for the backward of `step()` (the activations)."""
    import torch

    sizes: dict[int, int] = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(sizes.values()) / 2**20


def _models(model_dir: str, names: set[str]) -> dict:
    """The models the training cases named `names` run on, each loaded only when asked for."""
    from loraflow.stages.train.dropout import use_cpu_dropout

    def cpu_dropout(source: str, unchecked: int = 0, selective: bool = False):
        model = _load(model_dir, upcast=False, checkpointing=True, dropout=0.05, selective=selective)
        use_cpu_dropout(model, source=source)
        _checkpoint_all_but(model, unchecked)
        return model

    def lora_in_bf16():
        model = cpu_dropout("sfc64")
        for module in model.modules():  # the LoRA path in bf16 under autocast: no cast of its input to fp32
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
        return model

    loaders = {"upcast": lambda: _load(model_dir), "kept": lambda: _load(model_dir, upcast=False),
               "checkpointed": lambda: _load(model_dir, upcast=False, checkpointing=True),
               "dequantized": lambda: _with_lora(_load(model_dir, dequantize=True)),
               "dropout": lambda: _load(model_dir, upcast=False, checkpointing=True, dropout=0.05),
               "torch draws": lambda: cpu_dropout("torch"), "cpu dropout": lambda: cpu_dropout("sfc64"),
               "partial": lambda: cpu_dropout("sfc64", PARTIAL),
               "selective": lambda: cpu_dropout("sfc64", selective=True), "autocast": lora_in_bf16}
    return {name: loaders[name]() for name in names}


def train_levers(model_dir: str, examples: list[dict], batch: int, steps: int, max_length: int,
                 rounds: int = 2, only: list[int] | None = None) -> list[tuple]:
    """[(lever, seconds/step median, min, max, loss of the last batch, MB saved for backward on the 4 longest
    examples, the median over batches of the row above's (or the case's named row's) time / this row's on the same
    batch (None where that row was not measured or runs other batches))] over the same `steps` batches; `only`: the
    cases (0-based, in order) to measure."""
    import torch
    from transformers import DataCollatorWithFlattening

    from loraflow.stages.train.collators import CompletionCollator
    from loraflow.hardware import resolve_compute_dtype
    from loraflow.stages.train.trainer import body_and_head, label_only_loss

    pad = CompletionCollator(pad_token_id=0)
    to_512 = CompletionCollator(pad_token_id=0, pad_to_multiple_of=max_length)
    everything = lambda b: {**b, "labels": torch.where(b["attention_mask"] == 1, b["input_ids"], -100)}  # noqa: E731
    full = lambda m: lambda b: m(**b, use_cache=False).loss  # noqa: E731
    label_only = lambda m: (lambda parts: lambda b: label_only_loss(*parts, b)[0])(body_and_head(m))  # noqa: E731

    def autocast(m):  # the forward under CPU bf16 autocast (the checkpointed layers' recomputation replays it)
        step = label_only(m)

        def run(b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return step(b)
        return run
    rand = [examples[i * batch:(i + 1) * batch] for i in range(steps)]
    # length-grouped: the same examples, sorted by length, so each batch holds similar lengths
    pool = sorted(sum(rand, []), key=lambda e: len(e["input_ids"]))
    grouped = [pool[i * batch:(i + 1) * batch] for i in range(steps)]
    dtype = resolve_compute_dtype("auto")
    # (name, model, batches, collate, loss[, 0-based row its per-batch column compares with; default: the row above])
    cases = [
        ("plain script: pad to max_length, loss and logits on every token", "upcast", rand,
         lambda b: everything(to_512(b)), full),
        ("pad to the batch's longest, completion-only loss", "upcast", rand, pad, full),
        ("+ logits only at label positions", "upcast", rand, pad, label_only),
        ("+ length-grouped batches", "upcast", grouped, pad, label_only),
        (f"+ frozen weights kept in {dtype}, not upcast to fp32 (loraflow default)", "kept", grouped, pad, label_only),
        ("+ activation checkpointing, non-reentrant (`train.gradient_checkpointing: true`)", "checkpointed", grouped,
         pad, label_only),
        (f"+ frozen weights dequantized to {dtype} once (no NF4 in the step)", "dequantized", grouped, pad, label_only),
        ("packed, padding-free, logits only at labels", "upcast", rand, DataCollatorWithFlattening(), label_only),
        ("checkpointed, with the LoRA dropout of the benchmark's configs (0.05), peft's `nn.Dropout`", "dropout",
         grouped, pad, label_only),
        ("+ that dropout from 16-bit lanes of torch's 64-bit draws (`stages/train/dropout.py`, source torch)",
         "torch draws", grouped, pad, label_only),
        ("+ the draws from NumPy's SFC64 seeded by one torch draw (loraflow's default on a CPU)", "cpu dropout",
         grouped, pad, label_only),
        (f"+ the last {PARTIAL} layers not checkpointed (transformers' per-layer flag)", "partial", grouped, pad,
         label_only),
        ("row 11, checkpointing selective (torch's): the base's matmul and attention outputs kept, the rest recomputed",
         "selective", grouped, pad, label_only, 10),
        ("row 11 under CPU bf16 autocast, peft's fp32 cast of the LoRA input off (the LoRA path in bf16; loraflow's "
         "default with bf16 compute since 2026-12-06, `train.bf16: auto`)", "autocast",
         grouped, pad, autocast, 10),
    ]
    picked = [i for i in range(len(cases)) if only is None or i in only]
    models = _models(model_dir, {cases[i][1] for i in picked})
    cases = [(name, models[m], batches, collate, loss(models[m]), i, *ref)
             for i, (name, m, batches, collate, loss, *ref) in enumerate(cases) if i in picked]
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    losses: dict[str, float] = {}
    saved: dict[str, float] = {}
    longest = grouped[-1]  # the warm-up batch of every case: its activations are the peak's
    for r in range(rounds):
        for name, model, batches, collate, loss_fn, *_ in cases[r % len(cases):] + cases[:r % len(cases)]:
            if name not in saved:
                saved[name] = saved_for_backward_mb(lambda: loss_fn(collate(longest)))  # warm-up, not timed
            else:
                loss_fn(collate(longest)).backward()
            model.zero_grad()
            for b in batches:
                inputs = collate(b)
                t = time.perf_counter()
                loss = loss_fn(inputs)
                loss.backward()
                times[name].append(time.perf_counter() - t)
                model.zero_grad()
            losses[name] = float(loss)
    out, measured = [], {i: (name, batches) for name, _, batches, _, _, i, *_ in cases}
    for name, _, batches, _, _, i, *ref in cases:
        other = measured.get(ref[0] if ref else i - 1)
        paired = (statistics.median(a / b for a, b in zip(times[other[0]], times[name], strict=True))
                  if other is not None and other[1] is batches else None)
        out.append((name, statistics.median(times[name]), min(times[name]), max(times[name]), losses[name],
                    saved[name], paired))
    for row in out:
        print(f"train  {row[0]}: {row[1]:.2f} s/step ({row[2]:.2f}-{row[3]:.2f}, n={len(times[row[0]])}), "
              f"{row[5]:.0f} MB saved for backward" + (f", {row[6]:.3f}x its paired row per batch" if row[6] else ""),
              flush=True)
    return out


def eval_levers(model_dir: str, prompts: list[list[int]], tokenizer, max_new_tokens: int, batch: int):
    """[(lever, examples/s, outputs identical to the first row's)]."""
    import torch
    from peft import PeftModel

    from loraflow.config import EvalConfig
    from loraflow.stages.generation import generate

    torch.manual_seed(1)
    adapter = REPO / "runs" / "bench-levers-adapter"
    quantized = _load(model_dir)
    for name, p in quantized.named_parameters():  # a non-trivial adapter: B != 0, so merging matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    quantized.save_pretrained(adapter)
    quantized.eval()
    ev = lambda bs: EvalConfig(max_new_tokens=max_new_tokens, batch_size=bs)  # noqa: E731

    def timed(model, bs):
        model.config.use_cache = True
        t = time.perf_counter()
        outs = generate(model, tokenizer, prompts, ev(bs), "levers")
        return outs, len(prompts) / (time.perf_counter() - t)

    rows = []
    ref, rate = timed(quantized, 1)
    rows.append(("plain script: one generate per example, 4-bit", rate, True))
    outs, rate = timed(quantized, batch)
    rows.append((f"batches of {batch}, sorted by length, left-padded, 4-bit", rate, outs == ref))
    beside = PeftModel.from_pretrained(_load(model_dir, dequantize=True), adapter).eval()
    outs, rate = timed(beside, batch)
    rows.append(("+ dequantized once, adapter beside the weights (loraflow default on CPU)", rate, outs == ref))
    merged = beside.merge_and_unload().eval()
    outs, rate = timed(merged, batch)
    rows.append(("+ dequantized once, adapter merged (`eval.merge: true`)", rate, outs == ref))
    for r in rows:
        print(f"eval   {r[0]}: {r[1]:.3f} ex/s, same outputs: {r[2]}", flush=True)
    return rows


def tokenize_levers(tokenizer, texts: list[str]) -> list[tuple[str, float]]:
    t = time.perf_counter()
    for text in texts:
        tokenizer(text, add_special_tokens=False)
    one = len(texts) / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokenizer(texts[i:i + 1000], add_special_tokens=False)
    batched = len(texts) / (time.perf_counter() - t)
    return [("one call per example", one), ("batched calls of 1000 (loraflow)", batched)]


def scitldr_data(n_train: int, n_test: int, max_length: int):
    """SmolLM2's folder and tokenizer, and SciTLDR rows drawn into `runs/bench-levers-data`: (model folder, tokenizer,
    {"train", "test": rows}, the train rows as examples {input_ids, labels}, the test rows' generation prompts)."""
    from loraflow.config import PromptConfig
    from loraflow.store.sources import resolve_model_dir
    from loraflow.stages.tokenize import bos_prefix, encode_batch, load_tokenizer

    model_dir = str(resolve_model_dir("smollm2-gguf", None, None, False))
    data = REPO / "runs" / "bench-levers-data"
    write_examples("scitldr", model_dir, data, n_train, n_test, max_length)
    tokenizer = load_tokenizer(model_dir)
    prompt = PromptConfig(style="chat", template=INSTRUCTIONS["scitldr"], max_length=max_length)
    rows = {s: [json.loads(x) for x in (data / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")}
    cols = lambda rs: {"input": [r["input"] for r in rs], "target": [r["target"][0] for r in rs]}  # noqa: E731
    enc = encode_batch(cols(rows["train"]), prompt, tokenizer, bos_prefix(tokenizer))
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(enc["input_ids"], enc["labels"])]
    prompts = encode_batch(cols(rows["test"]), prompt, tokenizer, bos_prefix(tokenizer))["prompt_ids"]
    return model_dir, tokenizer, rows, examples, prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per case and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the cases, in rotated order")
    p.add_argument("--cases", type=int, nargs="+", help="only these training cases (0-based rows of the table); "
                   "the other rows are kept from --out")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "levers.json")
    p.add_argument("--parts", nargs="+", choices=["train", "eval", "tokenize"], default=["train", "eval", "tokenize"],
                   help="which tables to measure (the others are kept from --out when it exists)")
    a = p.parse_args(argv)


    model_dir, tokenizer, rows, examples, prompts = scitldr_data(a.steps * a.batch_size, a.eval_examples,
                                                                 a.max_length)
    from loraflow.hardware import machine, matmul_peaks

    partial = set(a.parts) != {"train", "eval", "tokenize"} or a.cases
    report = json.loads(a.out.read_text()) if a.out.is_file() and partial else {}
    measured = {"machine": machine(), "matmul_peaks": matmul_peaks()}
    if "train" in a.parts:
        measured["train"] = train_levers(model_dir, examples, a.batch_size, a.steps, a.max_length, a.rounds, a.cases)
        if a.cases:  # the rows measured replace theirs; the others stay as they were
            fresh = {row[0]: row for row in measured["train"]}
            kept = json.loads(a.out.read_text()).get("train", []) if a.out.is_file() else []
            measured["train"] = [fresh.pop(row[0], row) for row in kept] + list(fresh.values())
    if "eval" in a.parts:
        measured["eval"] = eval_levers(model_dir, prompts, tokenizer, a.max_new_tokens, a.eval_examples)
    if "tokenize" in a.parts:
        measured["tokenize"] = tokenize_levers(tokenizer, [r["input"] for r in rows["train"]] * 50)
    for part in a.parts:  # each table with the machine it was measured on
        report[part] = measured[part]
        report.setdefault("measured_on", {})[part] = {"machine": measured["machine"], "date": dt.date.today().isoformat()}
    report.update(machine=measured["machine"], matmul_peaks=measured["matmul_peaks"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    if "train" in report:
        base = report["train"][0][1]
        print("\n| training lever | s/step, median (min–max) | vs plain script "
              "| vs the row above (or the row it names), per batch "
              "| saved for backward, 4 longest, MB |\n|---|---|---|---|---|")
        for name, sec, low, high, _, mb, *paired in report["train"]:
            above = f"{paired[0]:.3f}x" if paired and paired[0] else "–"
            print(f"| {name} | {sec:.2f} ({low:.2f}–{high:.2f}) | {base / sec:.2f}x faster | {above} | {mb:.0f} |")
    if "eval" in report:
        base = report["eval"][0][1]
        print("\n| evaluation lever | examples/s | vs plain script | same outputs |\n|---|---|---|---|")
        for name, rate, same in report["eval"]:
            print(f"| {name} | {rate:.3f} | {rate / base:.2f}x | {'yes' if same else 'no'} |")
    if "tokenize" in report:
        base = report["tokenize"][0][1]
        print("\n| tokenization | examples/s | vs one call per example |\n|---|---|---|")
        for name, rate in report["tokenize"]:
            print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
