"""Where the memory of a loraflow run goes: the training process by phase and by kind, and the flow process.

    uv run python -m benchmarks.memory                       # aclsum, the benchmark's settings, checkpointing auto/on/off
    uv run python -m benchmarks.memory --dataset scitldr --checkpointing off on

The rows and settings are `benchmarks.run`'s (same draw, SmolLM2-135M NF4 + LoRA r16, batch 4, 512 tokens). The
data, tokenize and model stages are built once here (`store.build`, as the tasks build them); then, for each
`train.gradient_checkpointing` setting, a fresh process runs the real train stage (`train_adapter`, as the training
process does) with one more TrainerCallback that marks the phases, while a thread samples the process's RSS at
~1 kHz (/proc/self/statm). A fresh process per setting: RSS never shrinks, so settings must not share one.

By phase: RSS when the phase starts, its peak inside and when it ends. Phases: Python and the libraries imported;
the model loaded and the Trainer built; step 1's forward (to the LM head's output), its backward (to the
optimizer), the optimizer step; the later steps; what follows the last step (evaluation, saving).
By kind, at step 1: the frozen weights (4-bit packed and the rest), the LoRA weights, their gradients and the
optimizer's state (tensors counted), the tensors autograd saves for backward (`saved_tensors_hooks`, distinct
storages: the activations), the LM head's output (logits), the mapped files' resident pages (shared libraries,
the tokenized data), and the rest of the peak: temporaries freed within the step, allocator caching and
fragmentation. After every step: the RSS and the C heap in use (glibc's `mallinfo2`), which show what grows over a
long run (`--steps 72`, the demo's length). `--set` applies a `loraflow run --set` override (e.g.
`train.pad_to_multiple_of=1`); the training process gets loraflow's environment (`hardware.KERNEL_CACHES` unless
set), so `ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024` measures oneDNN's defaults.

The flow process (`--flow`, on by default): RSS after importing Prefect and the flows, after the tokenize stage
(transformers' tokenizer) and after the model stage (torch and a 4-bit model loaded and saved): what sits next
to the training child while it trains.

Writes benchmarks/results/memory.json and prints the markdown tables docs/benchmarks.md holds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.data import REPO
from loraflow.hardware import KERNEL_CACHES, heap_in_use

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 / 2**20


def rss_bytes() -> tuple[int, int]:
    """(resident, of which file-backed shared pages) of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as fh:
        fields = fh.read().split()
    return int(fields[1]) * PAGE, int(fields[2]) * PAGE


class Sampler:
    """RSS of this process every `period` s in a thread; `mark(name)` starts a phase."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.phases, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.shared_peak = 0

    def mark(self, name: str) -> None:
        rss, _ = rss_bytes()
        if self.phases:
            self.phases[-1]["end"] = rss
        self.phases.append({"phase": name, "start": rss, "peak": rss, "end": rss})

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, shared = rss_bytes()
            if self.phases:
                self.phases[-1]["peak"] = max(self.phases[-1]["peak"], rss)
            self.shared_peak = max(self.shared_peak, shared)
            time.sleep(self.period)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self.mark("end")
        self._stop.set()
        self._thread.join()
        self.phases.pop()
        return [{k: (round(v * MB, 1) if k != "phase" else v) for k, v in p.items()} for p in self.phases]


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def phase_callback(sampler: Sampler, kinds: dict, steps: list):
    """Marks the phases of training, counts at step 1 what each kind of tensor holds, and appends to `steps` the RSS
    and the C heap in use after every step (what grows over a long run)."""
    import contextlib

    import torch
    from transformers import TrainerCallback

    class Phases(TrainerCallback):
        def __init__(self) -> None:
            self.stack = contextlib.ExitStack()
            self.saved: dict[int, int] = {}
            self.hook = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            frozen = [p for p in model.parameters() if not p.requires_grad]
            kinds["frozen weights, 4-bit packed"] = _bytes(p for p in frozen if p.dtype == torch.uint8)
            kinds["frozen weights, other (embeddings, norms)"] = _bytes(p for p in frozen if p.dtype != torch.uint8)
            kinds["LoRA weights"] = _bytes(p for p in model.parameters() if p.requires_grad)

            def logits(_module, _inputs, output):
                if state.global_step == 0 and "logits (the LM head's output)" not in kinds:
                    kinds["logits (the LM head's output)"] = output.untyped_storage().nbytes()
                    sampler.mark("step 1: backward")

            self.hook = model.get_output_embeddings().register_forward_hook(logits)
            sampler.mark("step 1: forward")

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                def pack(t):
                    storage = t.untyped_storage()
                    self.saved[storage.data_ptr()] = storage.nbytes()
                    return t

                self.stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.stack.close()
                kinds["saved for backward (activations)"] = sum(self.saved.values())
                kinds["LoRA gradients"] = _bytes(p.grad for p in model.parameters() if p.grad is not None)
                sampler.mark("step 1: optimizer step")

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 0:
                tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
                kinds["optimizer state"] = _bytes(tensors)

        def on_step_end(self, args, state, control, **kwargs):
            heap = heap_in_use()
            steps.append({"step": state.global_step, "rss_mb": round(rss_bytes()[0] * MB, 1),
                          "heap_in_use_mb": None if heap is None else round(heap * MB, 1)})
            if state.global_step == 1:
                sampler.mark("steps 2 and later")
            if state.global_step == state.max_steps:
                sampler.mark("after the last step (evaluation, saving)")
                self.hook.remove()

    return Phases()


def train_child(request: dict) -> dict:
    """One training process: the real train stage with the phase callback (run in a fresh interpreter)."""
    sampler = Sampler().start()
    sampler.mark("Python and the libraries imported")
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from loraflow.config import PipelineConfig
    from loraflow.store import StageKey
    from loraflow.store.artifacts import Handle
    from loraflow.stages import model as model_stage
    from loraflow.stages.train.stage import train_adapter

    libraries = rss_bytes()[0]
    sampler.mark("model loaded, Trainer built")
    kinds: dict[str, int] = {}
    steps: list[dict] = []
    cfg = PipelineConfig.model_validate(request["cfg"])
    # As a run trains on a miss: the model stage is built in this process, and training goes on with that model
    # (`launch.build_model`); its folder here is scratch.
    built, _ = model_stage.build(cfg.model, cfg.quantization, cfg.lora, Path(request["output_dir"]) / "model-scratch",
                                 cfg.run.cache_dir, training=True)
    handle = train_adapter(cfg, Handle(**request["tokenized"]), Handle(**request["model"]), request["output_dir"],
                           StageKey(**request["key"]), callbacks=[phase_callback(sampler, kinds, steps)], built=built)
    del built
    phases = sampler.stop()
    peak = max(p["peak"] for p in phases)
    from loraflow.stages.train.stage import longest_batch_estimate

    model = Handle(**request["model"])
    estimate = longest_batch_estimate(cfg, model.info["base_dir"], Path(request["tokenized"]["path"]) / "stats.json",
                                      bool(handle.info["gradient_checkpointing"])).total * MB
    counted = sum(kinds.values()) - kinds.get("logits (the LM head's output)", 0)  # logits: saved for backward too
    by_kind = {"Python, torch, transformers, peft, bitsandbytes, datasets (after import)": round(libraries * MB, 1),
               **{k: round(v * MB, 1) for k, v in kinds.items()}}
    by_kind["the rest at the peak: temporaries, allocator caching, fragmentation"] = round(
        peak - (libraries + counted) * MB, 1)
    return {"checkpointing": request["checkpointing"], "peak_rss_mb": peak,
            "preflight_estimate_mb": round(estimate, 1), "estimate_over_peak": round(estimate / peak, 3),
            "resident_file_pages_peak_mb": round(sampler.shared_peak * MB, 1), "phases": phases, "kinds": by_kind,
            "kinds_bytes": kinds, "steps": steps,
            "train_metrics": {k: handle.info.get(k) for k in ("gradient_checkpointing", "peak_rss_mb",
                                                              "train_examples_per_second", "global_step")}}


def flow_child(request: dict) -> dict:
    """What the flow process holds: RSS after each import and each stage it runs itself."""
    from loraflow.hardware import resolve

    rows = [("Python", rss_bytes()[0])]
    import prefect  # noqa: F401

    rows.append(("+ prefect imported", rss_bytes()[0]))
    import flows.finetune  # noqa: F401

    rows.append(("+ loraflow's flows imported (no torch)", rss_bytes()[0]))
    from loraflow import store
    from loraflow.config import PipelineConfig
    from loraflow.stages import data, model, tokenize

    cfg = resolve(PipelineConfig.model_validate(request["cfg"]))
    out = Path(request["scratch"])
    keys = store.chain(cfg)
    d = store.build(out, keys["data"], True, lambda f: data.run(cfg.data, f))
    rows.append(("+ the data stage run (datasets)", rss_bytes()[0]))
    store.build(out, keys["tokenize"], True, lambda f: tokenize.run(d, cfg.prompt, cfg.model, f, cfg.run.cache_dir))
    rows.append(("+ the tokenize stage run here (transformers' tokenizer imports torch; only without an early-started "
                 "training process)", rss_bytes()[0]))
    # The pre-flight, tokenize and model stages run in the training process when one was started early
    # (`launch.ask`); here only where none was (train.early_start false, several processes, a remote output_dir,
    # or a train stage that is a hit).
    store.build(out, keys["model"], True,
                lambda f: model.run(cfg.model, cfg.quantization, cfg.lora, f, cfg.run.cache_dir), model.INFO)
    rows.append(("+ the model stage run here (only without an early-started training process)", rss_bytes()[0]))
    return {"rows": [(name, round(b * MB, 1)) for name, b in rows]}


def _child(kind: str, request: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", kind, json.dumps(request)],
                          cwd=REPO, capture_output=True, text=True,
                          env={**KERNEL_CACHES, **os.environ, "TOKENIZERS_PARALLELISM": "false"})  # as a run's child
    if done.returncode != 0:
        raise SystemExit(f"error: the {kind} process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    runs = report["training"]
    names = [r["checkpointing"] for r in runs]
    lines = [f"Training process, {report['dataset']} ({report['machine']['cpu']}, {report['date']}); "
             f"`train.gradient_checkpointing` per column (auto chose: "
             f"{', '.join(str(r['train_metrics']['gradient_checkpointing']) for r in runs if r['checkpointing'] == 'auto') or '-'}).",
             "", "By phase, RSS in MB: start → peak inside (end)", "",
             "| phase | " + " | ".join(f"checkpointing {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    for i, p in enumerate(runs[0]["phases"]):
        cells = [f"{r['phases'][i]['start']:.0f} → **{r['phases'][i]['peak']:.0f}** ({r['phases'][i]['end']:.0f})"
                 for r in runs]
        lines.append(f"| {p['phase']} | " + " | ".join(cells) + " |")
    lines += ["", "By kind, MB (counted at step 1; the rest is the peak minus what is counted)", "",
              "| kind | " + " | ".join(f"checkpointing {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    for kind in runs[0]["kinds"]:
        lines.append(f"| {kind} | " + " | ".join(f"{r['kinds'].get(kind, 0):.1f}" for r in runs) + " |")
    lines.append("| **peak RSS of the training process** | " + " | ".join(f"**{r['peak_rss_mb']:.0f}**" for r in runs)
                 + " |")
    lines.append("| of which mapped files' resident pages (libraries, data), at most | "
                 + " | ".join(f"{r['resident_file_pages_peak_mb']:.0f}" for r in runs) + " |")
    lines.append("| pre-flight estimate (`stages/memory.py`), MB, and ÷ the measured peak | "
                 + " | ".join(f"{r['preflight_estimate_mb']:.0f} ({r['estimate_over_peak']:.2f}x)" for r in runs) + " |")
    lines.append("| training examples/s (these few steps) | "
                 + " | ".join(f"{r['train_metrics']['train_examples_per_second']}" for r in runs) + " |")
    if all(r.get("steps") for r in runs):
        def after(r, i):
            row = r["steps"][i]
            heap = "-" if row["heap_in_use_mb"] is None else f"{row['heap_in_use_mb']:.0f}"
            return f"{row['rss_mb']:.0f} / {heap}"
        lines.append("| RSS / C heap in use after step 1, MB | " + " | ".join(after(r, 0) for r in runs) + " |")
        lines.append("| RSS / C heap in use after the last step, MB | " + " | ".join(after(r, -1) for r in runs) + " |")
    if report.get("set") or report.get("environment"):
        lines.append(f"\nSettings: {report.get('set') or 'defaults'}; environment: {report.get('environment') or '-'}")
    if report.get("flow"):
        lines += ["", "The flow process (RSS in MB after each step, as `loraflow run` does them)", "",
                  "| step | RSS, MB |", "|---|---|"]
        lines += [f"| {name} | {mb:.0f} |" for name, mb in report["flow"]["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="aclsum", choices=["aclsum", "scitldr"])
    p.add_argument("--checkpointing", nargs="+", default=["auto", "on", "off"], choices=["auto", "on", "off"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-flow", dest="flow", action="store_false", help="skip the flow process's table")
    p.add_argument("--set", dest="loraflow_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a `loraflow run --set` override, e.g. train.pad_to_multiple_of=1 (repeatable)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-memory")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    p.add_argument("--child", nargs=2, metavar=("KIND", "REQUEST"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        result = (train_child if a.child[0] == "train" else flow_child)(json.loads(a.child[1]))
        print(json.dumps(result))
        return 0

    import shutil

    from benchmarks.data import write_examples
    from benchmarks.run import bench_config
    from loraflow import store
    from loraflow.config import build_config
    from loraflow.hardware import cpu_model, resolve
    from loraflow.stages import data, model, tokenize
    from loraflow.store.sources import resolve_model_dir

    shutil.rmtree(a.work, ignore_errors=True)
    data_dir = a.work / "data"
    defaults = argparse.Namespace(model="smollm2-gguf", max_length=512, seed=0, steps=a.steps, batch_size=4,
                                  learning_rate=1e-3, max_new_tokens=48, eval_batch_size=12,
                                  loraflow_set=a.loraflow_set)
    model_dir = str(resolve_model_dir(defaults.model, None, None, False))
    write_examples(a.dataset, model_dir, data_dir, 256, 64, defaults.max_length, 0, 32)
    base = bench_config(a.dataset, data_dir, a.work, defaults, seed=0)
    report = {"date": dt.date.today().isoformat(), "dataset": a.dataset, "steps": a.steps, "set": a.loraflow_set,
              "environment": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("MALLOC_")
                              or k in KERNEL_CACHES},
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "training": []}
    if a.flow:
        report["flow"] = _child("flow", {"cfg": resolve(build_config(base)).model_dump(mode="json"),
                                         "scratch": str(a.work / "flow-scratch")})
    out = a.work / "runs"
    for setting in a.checkpointing:
        value = {"auto": "auto", "on": True, "off": False}[setting]
        cfg = resolve(build_config({**base, "train": {**base["train"], "gradient_checkpointing": value}}))
        keys = store.chain(cfg)
        d = store.build(out, keys["data"], False, lambda f: data.run(cfg.data, f))
        t = store.build(out, keys["tokenize"], False, lambda f: tokenize.run(d, cfg.prompt, cfg.model, f, None))
        m = store.build(out, keys["model"], False, lambda f: model.run(cfg.model, cfg.quantization, cfg.lora, f, None),
                        model.INFO)
        # each setting trains into its own folder: the setting is not in the train key (it does not shape the result)
        run = _child("train", {"cfg": cfg.model_dump(mode="json"), "tokenized": t.model_dump(), "model": m.model_dump(),
                               "output_dir": str(a.work / f"train-{setting}"),
                               "key": {"stage": "train", "parts": keys["train"].parts},
                               "checkpointing": setting})
        report["training"].append(run)
        print(f"checkpointing {setting}: peak {run['peak_rss_mb']:.0f} MB", flush=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nresults: {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
