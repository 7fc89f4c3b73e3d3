"""loraflow's training and generation on a CUDA GPU, side by side with the fair plain-Trainer script and TRL.

    python -m benchmarks.gpu --out DIR              # on a GPU, ~3 min (scripts/gpu-check runs it)
    python -m benchmarks.gpu --dry-run --out DIR    # on a CPU: a tiny model, 2 + 2 steps a side (checks the harness)

Models: randomly initialised from configs shaped like SmolLM2-135M and Qwen2.5-0.5B (`SHAPES`: no weights
travel), saved once and loaded in NF4 by every side. Data: synthetic token ids with the prompt and target
lengths of 64 SciTLDR training examples (`LENGTHS`, SmolLM2's tokenizer and chat template), so the batches
are shaped like the real benchmark's. Every side trains NF4 + LoRA r16 all-linear, batch 8, the same steps,
learning rate, paged 8-bit AdamW and bf16 autocast, on the same examples:

- `baseline`: the script a competent user writes (benchmarks/baseline.py's fair variant): peft's
  prepare_model_for_kbit_training, `DataCollatorForSeq2Seq` (pad to the batch's longest, prompt labels -100),
  random batches, the model's own loss (logits at every position);
- `trl`: TRL's SFTTrainer on the same pre-tokenized rows with their completion masks (when trl is installed);
- `loraflow`: its train stage's pieces (`load_base`, `prepare_for_training`, `training_arguments`,
  `CompletionTrainer`, `make_collator`) with the defaults: length-grouped batches, logits only at labels,
  frozen non-4-bit weights kept in bf16;
- the levers, one at a time from loraflow's default: logits at every position; Liger's fused linear
  cross-entropy instead (when liger-kernel is installed); packed rows; random batches.

Per side: examples/s and label tokens/s over the timed epoch (the GPU synchronised at each step's end). Each
side trains two epochs of the same `--steps` batches and only the second is timed: the first pays for the
optimizer state, the allocator and the kernels' first calls, and a whole epoch is the only window in which
length-grouped batches hold the same examples as random ones (a few warm-up steps would leave a different
subset untimed on each side). Then model FLOP utilisation against the bf16 matmul peak measured in the same
run (FLOPs counted from the config and the batches' shapes, `benchmarks/flops.py`: padding included, as the
GPU executes it), peak GPU memory (`max_memory_allocated`, with loraflow's pre-flight estimate beside it) and
the loss. Generation:
examples/s of loraflow's batched `generate` against one `generate` per example, both producing exactly
`--new-tokens` tokens (the stop id is one the model cannot emit), on the 4-bit model with the adapter.
The models, data and sides are in `benchmarks/gpu_sides.py`. Writes DIR/gpu-benchmark.json; `--markdown FILE`
prints the tables of docs/benchmarks.md from it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_env import BLOCKED, versions
from benchmarks.gpu_sides import SHAPES, SIDES, build, examples, lora, side_trainer, step_clock, tokenizer_for

VERSIONS = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "liger-kernel"]

def measure(side: str, model_dir: Path, rows: list[dict], out: Path, a: argparse.Namespace, peak_tflops: float) -> dict:
    """Train one side; its speed, utilisation, memory and losses."""
    import torch

    from benchmarks.flops import model_shape, training_flops
    from loraflow.hardware import resolve_compute_dtype

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, resolve_compute_dtype("auto"))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = step_clock()
    t0 = time.perf_counter()
    trainer, counted = side_trainer(side, model_dir, rows, out, argparse.Namespace(**{**vars(a), "steps": 2 * a.steps}),
                                    clock, dtype)
    loaded_s = time.perf_counter() - t0
    result = trainer.train()
    warm = a.steps  # the untimed first epoch
    steady = counted.batches[warm:2 * a.steps]
    seconds = clock.ends[-1] - clock.ends[warm - 1]
    shape = model_shape(model_dir)
    label_only = getattr(trainer, "parts", None) is not None
    flops = sum(training_flops(shape, b["rows"] * b["length"], b["labels"] if label_only else b["rows"] * b["length"],
                               b["rows"] * b["length"] ** 2) for b in steady)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    step_s = [b - c for b, c in zip(clock.ends[warm:], clock.ends[warm - 1:])]
    report = {
        "steps": trainer.state.global_step, "timed_steps": len(steady),
        "timed_examples": sum(b["examples"] for b in steady), "timed_label_tokens": sum(b["labels"] for b in steady),
        "examples_per_second": round(sum(b["examples"] for b in steady) / seconds, 2),
        "label_tokens_per_second": round(sum(b["labels"] for b in steady) / seconds, 1),
        "seconds_per_step_median": round(statistics.median(step_s), 4),
        "model_tflops_per_second": round(flops / seconds / 1e12, 2),
        "mfu": round(flops / seconds / 1e12 / peak_tflops, 4) if peak_tflops else None,
        "padded_positions_per_step": round(sum(b["rows"] * b["length"] for b in steady) / len(steady), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss, "load_s": round(loaded_s, 2), "label_only_logits": label_only,
    }
    if side == "loraflow":
        report["memory_estimate_gib"] = estimate_gib(model_dir, counted.batches, a)
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return report


def estimate_gib(model_dir: Path, batches: list[dict], a: argparse.Namespace) -> float:
    """loraflow's pre-flight training estimate (`loraflow.stages.memory`) for the longest batch this side saw."""
    import torch
    from transformers import AutoConfig

    from loraflow.stages import memory
    from loraflow.config import PipelineConfig

    longest = max(batches, key=lambda b: b["length"])
    cfg = PipelineConfig()
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"per_device_train_batch_size": a.batch})})
    parts = memory.training(cfg, memory.shapes(AutoConfig.from_pretrained(model_dir)), longest["rows"],
                            longest["length"], longest["labels"], torch.cuda.is_available(), False)
    return round(sum(parts.values()) / memory.GIB, 3)


def generation(model_dir: Path, a: argparse.Namespace) -> dict:
    """Examples/s of loraflow's batched generate vs one generate per example, exactly `a.new_tokens` each."""
    import torch
    from peft import get_peft_model

    from loraflow.config import EvalConfig, ModelConfig, QuantizationConfig
    from loraflow.stages.generation import generate
    from loraflow.hardware import resolve_compute_dtype

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype=resolve_compute_dtype("auto"))
    from loraflow.stages.model import load_base

    model = get_peft_model(load_base(model_dir, ModelConfig(name_or_path=str(model_dir)), quant), lora()).eval()
    model.config.use_cache = True
    tokenizer = tokenizer_for(vocab)
    prompts = [r["input_ids"][: r["labels"].count(-100)] for r in examples(a.prompts, vocab, seed=7, scale=a.scale)]
    never = [vocab]  # an id past the vocabulary: no stop, every row generates new_tokens
    ev = EvalConfig(max_new_tokens=a.new_tokens, batch_size=a.prompts)

    def timed(batch_size: int) -> tuple[float, list[str]]:
        generate(model, tokenizer, prompts[:2], ev.model_copy(update={"batch_size": 2}), "warm-up", never)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, tokenizer, prompts, ev.model_copy(update={"batch_size": batch_size}), "generate", never)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    batched_s, batched = timed(a.prompts)
    single_s, single = timed(1)
    return {"prompts": a.prompts, "new_tokens": a.new_tokens,
            "loraflow_batched_examples_per_second": round(a.prompts / batched_s, 2),
            "one_per_example_examples_per_second": round(a.prompts / single_s, 2),
            "speedup": round(single_s / batched_s, 2),
            "same_text": sum(x == y for x, y in zip(batched, single)),
            "all_full_length": all(len(t.split()) == a.new_tokens for t in batched + single)}


def run(a: argparse.Namespace) -> dict:
    import torch

    from loraflow.hardware import machine, matmul_peaks

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    peaks = matmul_peaks(size=8192 if cuda else 512, repeats=5)
    peak = peaks["bfloat16_gflops"] / 1000
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "dry_run": a.dry_run, "machine": machine(),
                              "versions": versions(VERSIONS), "matmul_peak_tflops": {k.split("_")[0]: v / 1000
                                                                             for k, v in peaks.items()},
                              "settings": {k: v for k, v in vars(a).items() if k not in ("out", "markdown")},
                              # made absent by benchmarks/absent.py (scripts/gpu-check), as on the GPU machine
                              "absent_packages": [n for n in BLOCKED if n in sys.modules and sys.modules[n] is None],
                              "models": {}}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["machine"]["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        report["machine"]["cuda"] = torch.version.cuda
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))  # the models and checkpoints: not under --out
    for shape in a.models:
        model_dir = build(shape, work / shape, "cuda" if cuda else "cpu")
        vocab = SHAPES[shape]["vocab_size"]
        rows = examples(a.steps * a.batch, vocab, seed=0, scale=a.scale)
        entry: dict[str, Any] = {"shape": SHAPES[shape], "sides": {}}
        report["models"][shape] = entry
        # untimed: the first training in a process pays for CUDA's and bitsandbytes' kernel loading, which no
        # side should carry (the sides run in a fixed order)
        measure("loraflow", model_dir, rows[: a.batch], work / shape / "warm-up",
                argparse.Namespace(**{**vars(a), "steps": 1}), peak)
        last = 0.0
        for side in a.sides:
            if time.perf_counter() - started + last > a.budget_s:
                entry["sides"][side] = {"skipped": f"time: the {a.budget_s:.0f} s budget would be passed"}
                continue
            t0 = time.perf_counter()
            try:
                entry["sides"][side] = measure(side, model_dir, rows, work / shape / side.replace(" ", "-"), a, peak)
            except ImportError as err:  # trl / liger-kernel not installed: a named skip, not a failure
                entry["sides"][side] = {"skipped": f"{type(err).__name__}: {err}"[:200]}
            except Exception as err:  # noqa: BLE001 - one side's failure is a finding; the others still run
                entry["sides"][side] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            last = time.perf_counter() - t0
            print(f"gpu bench: {shape} / {side}: {json.dumps(entry['sides'][side])}", flush=True)
        entry["generation"] = generation(model_dir, a)
        gc.collect()
        print(f"gpu bench: {shape} / generation: {json.dumps(entry['generation'])}", flush=True)
        _ratios(entry)
    report["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _ratios(entry: dict) -> None:
    """Each side's examples/s and peak memory as a ratio to the baseline's (measured in the same run)."""
    base = entry["sides"].get("baseline", {})
    for side in entry["sides"].values():
        if base.get("examples_per_second") and side.get("examples_per_second"):
            # three figures, not two decimals: a side 300x slower (a dry run's millisecond steps) is not 0
            side["speed_vs_baseline"] = float(f"{side['examples_per_second'] / base['examples_per_second']:.3g}")
        if base.get("peak_gpu_mb") and side.get("peak_gpu_mb"):
            side["memory_vs_baseline"] = round(side["peak_gpu_mb"] / base["peak_gpu_mb"], 2)


def markdown(report: dict) -> str:
    """The docs/benchmarks.md tables: one row per side and model, then generation."""
    m = report["machine"]
    lines = [f"Run {report['date']} on {m.get('gpu') or m.get('cpu')} (CUDA {m.get('cuda')}), torch "
             f"{report['versions']['torch']}, transformers {report['versions']['transformers']}; bf16 matmul peak "
             f"{report['matmul_peak_tflops']['bfloat16']:.0f} TFLOP/s measured in the run; batch "
             f"{report['settings']['batch']}, {report['settings']['steps']} timed steps (the second epoch; the "
             "first untimed).", "",
             "| model | side | examples/s | vs baseline | label tokens/s | MFU | peak GPU MiB | vs baseline | last loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape, entry in report["models"].items():
        for side, r in entry["sides"].items():
            if "examples_per_second" not in r:
                lines.append(f"| {shape} | {side} | {r.get('skipped') or r.get('error')} ||||||| ")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "—"
            lines.append(f"| {shape} | {side} | {r['examples_per_second']:.1f} | {r.get('speed_vs_baseline', '—')} | "
                         f"{r['label_tokens_per_second']:.0f} | {mfu} | {r['peak_gpu_mb']} | "
                         f"{r.get('memory_vs_baseline', '—')} | {r['last_loss']:.3f} |")
    lines += ["", "| model | loraflow batched generate, examples/s | one per example | speedup |", "|---|---|---|---|"]
    for shape, entry in report["models"].items():
        g = entry["generation"]
        lines.append(f"| {shape} | {g['loraflow_batched_examples_per_second']} | "
                     f"{g['one_per_example_examples_per_second']} | {g['speedup']}x |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu-bench"))
    p.add_argument("--dry-run", action="store_true", help="CPU, the tiny model, 2 + 2 steps a side, short rows")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["smollm2-135m", "qwen2.5-0.5b"])
    p.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES)
    p.add_argument("--steps", type=int, default=16, help="steps per epoch: two epochs run, the second is timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16, help="generation prompts")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=170.0, help="sides that would start past this are skipped")
    p.add_argument("--markdown", type=Path, help="print the docs tables of this result file and exit")
    a = p.parse_args(argv)
    a.scale = 1.0
    if a.steps < 1:
        p.error(f"--steps {a.steps}: give 1 or more (steps per epoch; the second epoch is timed)")
    if a.dry_run:
        a.models, a.steps, a.batch, a.prompts, a.new_tokens, a.scale = ["tiny"], 2, 2, 2, 3, 0.1
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.markdown:  # a gpu-benchmark.json, or the gpu-check.json that holds one
        loaded = json.loads(a.markdown.read_text())
        print(markdown(loaded["benchmark"]["report"] if "benchmark" in loaded else loaded))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    report = run(a)
    (a.out / "gpu-benchmark.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
