"""Small helpers shared by the test modules (not fixtures)."""

from __future__ import annotations

import json
import os
import random
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "mouse", "sheep", "goat"]


def write_examples(path: Path, n: int = 96) -> Path:
    """A learnable toy task: the target repeats two words of the input."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n):
            color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
            text = f"Report {i}: yesterday we saw a {color} {animal} near the old river bank at dawn."
            fh.write(json.dumps({"text": text, "summary": f"a {color} {animal}"}) + "\n")
    return path


# -- the stages outside Prefect: each key computed as `store.chain` computes it (from the resolved config), then the
# stage built as its task builds it (`store.build` around the stage's `run`; the train stage's launcher or `run`)

def prepare_data(data, out: Path, refresh: bool = False):
    from loraflow import store
    from loraflow.stages import data as stage

    return store.build(out, store.data_key(data), refresh, lambda folder: stage.run(data, folder))


def tokenize_data(data, prompt, tokenizer, out: Path, refresh: bool = False, cache_dir: str | None = None):
    """`tokenizer`: a model folder or the model config."""
    from loraflow import store
    from loraflow.config import ModelConfig
    from loraflow.stages import tokenize as stage
    from loraflow.store.sources import source_identity

    model = tokenizer if isinstance(tokenizer, ModelConfig) else ModelConfig(name_or_path=str(Path(tokenizer).resolve()))
    key = store.tokenize_key(data.fingerprint, prompt, source_identity(model.name_or_path, model.revision))
    return store.build(out, key, refresh, lambda folder: stage.run(data, prompt, model, folder, cache_dir))


def build_model(model, quant, lora, out: Path, cache_dir: str | None = None, refresh: bool = False):
    from loraflow import store
    from loraflow.hardware import resolve_quantization
    from loraflow.stages import model as stage

    quant = resolve_quantization(quant)
    return store.build(out, store.model_key(model, quant, lora), refresh,
                       lambda folder: stage.run(model, quant, lora, folder, cache_dir), stage.INFO)


def train_key(cfg, tokenized, model):
    from loraflow import store
    from loraflow.hardware import resolve

    return store.train_key(resolve(cfg), tokenized.fingerprint, model.fingerprint)


def train_adapter(cfg, tokenized, model, out: Path, **kw):
    """In this process (`train.stage.train_adapter`); `kw`: its callbacks, stop_requested, process."""
    from loraflow.hardware import resolve
    from loraflow.stages.train.stage import train_adapter as train

    return train(resolve(cfg), tokenized, model, out, train_key(cfg, tokenized, model), **kw)


def run_train_worker(cfg, tokenized, model, out: Path, on_progress=None):
    """In the training process, as the train task starts it (`launch.run_train_worker`)."""
    from loraflow.hardware import resolve
    from loraflow.stages.launch import run_train_worker as launch

    return launch(resolve(cfg), tokenized, model, out, train_key(cfg, tokenized, model), on_progress)


def evaluate_adapter(cfg, tokenized, model, trained, out: Path):
    from loraflow import store
    from loraflow.hardware import resolve
    from loraflow.stages import evaluate as stage

    cfg = resolve(cfg)
    key = store.evaluate_key(cfg, tokenized.fingerprint, model.fingerprint, trained.fingerprint)
    return store.build(out, key, cfg.run.refreshes("evaluate"),
                       lambda folder: stage.run(cfg, tokenized, model, trained, folder), stage.INFO)


def export_adapter(cfg, tokenized, model, trained, scores, out: Path):
    from loraflow import store
    from loraflow.hardware import resolve
    from loraflow.stages import export as stage

    cfg = resolve(cfg)
    return store.build(out, store.export_key(cfg, scores.fingerprint), cfg.run.refreshes("export"),
                       lambda folder: stage.run(cfg, tokenized, model, trained, scores, folder), stage.INFO)


def worker_request(cfg, tokenized, model, out: Path) -> str:
    """The JSON request `python -m loraflow.stages.worker` reads, as the launcher writes it (its key as a run
    computes it)."""
    from loraflow.hardware import resolve
    from loraflow.stages.launch import worker_request as request

    return json.dumps(request(resolve(cfg), tokenized, model, out, out / "result.json", train_key(cfg, tokenized, model)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_briefly(model, tokenizer, prompts: list[str], answer_ids: list[int], steps: int = 120, lr: float = 1e-2):
    """Teach a (peft) model to answer every prompt with `answer_ids`: a plain loop, confident in ~120 steps."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        prompt = tokenizer(prompts[step % len(prompts)])["input_ids"]
        ids = torch.tensor([prompt + answer_ids])
        model(input_ids=ids, labels=torch.tensor([[-100] * len(prompt) + answer_ids])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@contextmanager
def live_stack(home: Path, watch: bool = True) -> Iterator[dict]:
    """`loraflow up` in-process: a real `prefect server start`, the pool, the deployments, a worker (and the data
    watcher), each in its own process; PREFECT_HOME and PREFECT_API_URL point at them meanwhile."""
    from loraflow.ops.up import environment, start, stop

    port = free_port()
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home / "prefect-home")
    processes = start("127.0.0.1", port, "loraflow", log_dir=home / "logs", watch=watch)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    try:
        yield {"port": port, "home": home, "env": environment("127.0.0.1", port)}
    finally:
        stop(processes)
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# Imported by every Python process started with a folder holding it as sitecustomize.py on PYTHONPATH; in the training
# process only, each training step after `hold` waits while the gate file exists, until the worker is asked to stop.
_GATE = """
import os, sys, time
if "loraflow.stages.worker" in sys.orig_argv:
    from loraflow.stages.train.trainer import CompletionTrainer

    step = CompletionTrainer.training_step

    def held(self, *args, **kwargs):
        worker = sys.modules["__main__"]
        while (self.state.global_step >= {hold} and os.path.exists(os.environ["LORAFLOW_TEST_GATE"])
               and not worker.Preemption.requested):
            time.sleep(0.05)
        return step(self, *args, **kwargs)

    CompletionTrainer.training_step = held
"""


def gated(env: dict[str, str], folder: Path, hold: int) -> dict[str, str]:
    """`env` for a `loraflow run` whose training holds after step `hold` (its checkpoint written when save_steps
    divides it) while `folder/gate` exists; deleting the file, or a stop request, lets it go on."""
    hook = folder / "gate-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(_GATE.format(hold=hold))
    (folder / "gate").touch()
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
            "LORAFLOW_TEST_GATE": str(folder / "gate")}


# The same for the flow process's evaluate stage: when `loraflow.stages.evaluate` is imported, its `generate` is wrapped so
# that each call first marks `<gate>.reached`, then waits while the gate file exists.
_EVAL_GATE = """
import importlib.abc, importlib.machinery, os, sys, time


class _GateEvaluation(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "loraflow.stages.evaluate":  # also asked by find_spec alone (the code hash): every spec is wrapped
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            generate = module.generate

            def held(*args, **kwargs):
                gate = os.environ["LORAFLOW_TEST_EVAL_GATE"]
                open(gate + ".reached", "w").close()
                while os.path.exists(gate):
                    time.sleep(0.05)
                return generate(*args, **kwargs)

            module.generate = held

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _GateEvaluation())
"""


def gated_evaluation(env: dict[str, str], folder: Path) -> dict[str, str]:
    """`env` for a `loraflow run` whose evaluate stage holds at its first generation while `folder/eval-gate` exists
    (`folder/eval-gate.reached` appears when it does)."""
    hook = folder / "eval-gate-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(_EVAL_GATE)
    (folder / "eval-gate").touch()
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
            "LORAFLOW_TEST_EVAL_GATE": str(folder / "eval-gate")}
