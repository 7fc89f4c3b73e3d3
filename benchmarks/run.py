"""loraflow vs a fair plain Trainer script and vs TRL's SFTTrainer, side by side on the same rows, model and
settings, over several training seeds.

    uv run python -m benchmarks.run                      # SciTLDR and aclsum, seeds 0 1 2 3 (docs/benchmarks.md: the time)
    uv run python -m benchmarks.run --datasets aclsum --steps 4 --seeds 0 --test-examples 8   # a quick look

Every side trains on the same train.jsonl (loraflow reads validation.jsonl as its validation split, so it carves
nothing out of train) and is scored on the same test.jsonl (benchmarks/data.py). Per dataset and seed the sides
run alternately, in an order that rotates with the seed (A B C, B C A, ...): the fair baseline script
(benchmarks/baseline.py), TRL (benchmarks/trl_peer.py), and `loraflow run` cold (empty output folder and result
storage) followed by `loraflow run` again (everything cached). The seed is paired across sides: it sets the data
order and the LoRA initialisation of each (`train.seed` and `lora.seed` for loraflow; `--seed` for the scripts).
Each run is a separate command against one local Prefect server; its memory is the peak of the summed RSS over its
process tree (benchmarks/rss.py). ROUGE-L is reported per seed and compared with a two-level paired bootstrap
(seeds, then test rows: `loraflow.metrics.bootstrap.seeded_paired_bootstrap`); timings are medians and min-max over the
seeds' runs. `--naive` adds the naive script (one run per dataset); `--sides` and `--loraflow-set` run a subset or
a loraflow variant (e.g. `--loraflow-set train.batching=random`), `--carve-validation` gives loraflow no validation
file (what the 2026-12-01 run did). Writes benchmarks/results/<date>.json and benchmarks/results/summary.json
(or `--results`), and prints the markdown tables that docs/benchmarks.md holds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.data import INSTRUCTIONS, REPO, write_examples
from loraflow.hardware import resolve_compute_dtype, resolve_mixed_precision


SIDES = ["baseline", "trl", "loraflow"]  # alternated; "baseline-naive" (--naive) runs once, after the first seed


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `cmd`; wall seconds, launch time, the peak of the summed RSS over its process tree (sampled at
    20 Hz) with each process's own peak, and the largest single process (wait4 rusage)."""
    from benchmarks.rss import TreeSampler

    launched = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid).start()
        _, status, usage = os.wait4(proc.pid, 0)
        memory = sampler.stop()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited {code}: see {log}")
    return {"launched_at": launched, "wall_s": round(time.time() - launched, 2),
            "largest_process_rss_mb": round(usage.ru_maxrss / 1024, 1), **memory}


def bench_config(name: str, data_dir: Path, out: Path, a: argparse.Namespace, seed: int) -> dict:
    from loraflow.config import apply_overrides

    cfg = {
        "data": {"source": str(data_dir), "input_column": "input", "target_column": "target", "seed": a.seed},
        "prompt": {"style": "chat", "template": INSTRUCTIONS[name], "max_length": a.max_length, "max_target_length": 128},
        "model": {"name_or_path": a.model},
        "quantization": {"mode": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "seed": seed},
        "train": {"per_device_train_batch_size": a.batch_size, "max_steps": a.steps, "learning_rate": a.learning_rate,
                  "lr_scheduler_type": "cosine", "warmup_steps": 2, "logging_steps": 1, "save_steps": a.steps,
                  "save_total_limit": 1, "seed": seed, "report_to": []},
        # validation (validation.jsonl, what loraflow's choices read) generates one batch; the evaluation
        # examples/s compared is the test generation's alone
        "eval": {"max_new_tokens": a.max_new_tokens, "batch_size": a.eval_batch_size, "compare_base": False,
                 "max_validation_samples": a.eval_batch_size},
        "run": {"name": f"bench-{name}", "output_dir": str(out / "runs"), "result_storage": str(out / "results")},
    }
    return apply_overrides(cfg, a.loraflow_set)


def flow_timings(api_env: dict[str, str]) -> dict:
    """Flow-run time, its task runs' times and their start/end (epoch seconds: the cold run's timeline), from the
    Prefect API (the newest flow run)."""
    code = r"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as c:
    fr = c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
    stages = {t.name.split("-")[0]: t.total_run_time.total_seconds() for t in trs}
    at = {t.name.split("-")[0]: [t.start_time.timestamp(), t.end_time.timestamp()] for t in trs if t.start_time and t.end_time}
    print(json.dumps({"flow_s": fr.total_run_time.total_seconds(), "stages_s": stages, "stages_at": at,
                      "flow_at": [fr.start_time.timestamp(), fr.end_time.timestamp()]}))
"""
    done = subprocess.run([sys.executable, "-c", code], env=api_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: reading the flow run from the Prefect API failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loraflow_side(name: str, data_dir: Path, out: Path, a: argparse.Namespace, env: dict[str, str], seed: int,
                  checkpointing: str = "default") -> dict:
    """`checkpointing`: loraflow's default (`auto`), or forced "on" / "off" (the like-for-like memory rows)."""
    shutil.rmtree(out / "runs", ignore_errors=True)
    shutil.rmtree(out / "results", ignore_errors=True)
    cfg_path = out / f"loraflow-{seed}.yaml"
    cfg = bench_config(name, data_dir, out, a, seed)
    if checkpointing != "default":
        cfg["train"]["gradient_checkpointing"] = checkpointing == "on"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "loraflow.cli.main", "run", str(cfg_path)]
    cold = run_measured(cmd, env, out / f"loraflow-{seed}-cold.log")  # its temporary processes included (training child)
    cold["timings"] = flow_timings(env)
    cached = run_measured(cmd, env, out / f"loraflow-{seed}-cached.log")
    cached["timings"] = flow_timings(env)
    runs = out / "runs"
    train = json.loads(next(runs.glob("train/*/train_metrics.json")).read_text())
    history = json.loads(next(runs.glob("train/*/trainer_state.json")).read_text())["log_history"]
    metrics = json.loads(next(runs.glob("evaluate/*/metrics.json")).read_text())
    tok_stats = json.loads(next(runs.glob("tokenize/*/stats.json")).read_text())
    preds = [json.loads(line)["prediction"] for line in next(runs.glob("evaluate/*/predictions.jsonl")).open()]
    return {"seed": seed, "cold": cold, "cached": cached, "train": train, "eval": metrics, "tokenize_stats": tok_stats,
            "losses": [e["loss"] for e in history if "loss" in e],
            "mean_prediction_words": round(sum(len(p.split()) for p in preds) / len(preds), 2), "predictions": preds}


def peer_bf16(a: argparse.Namespace) -> bool:
    """bf16 autocast for the script and TRL: loraflow's `train.bf16: auto` on this machine, unless forced."""
    return resolve_mixed_precision("auto", "auto") if a.peer_bf16 == "auto" else a.peer_bf16 == "on"


def script_side(script: str, tag: str, data_dir: Path, out: Path, model_dir: str, name: str, a: argparse.Namespace,
                env: dict, seed: int, *extra: str) -> dict:
    """One run of benchmarks/<script> (the baseline or the TRL peer), its process measured."""
    result = out / f"{tag}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--train", str(data_dir / "train.jsonl"),
           "--test", str(data_dir / "test.jsonl"), "--model-dir", model_dir, "--out", str(result),
           "--instruction", INSTRUCTIONS[name], "--max-length", str(a.max_length), "--steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--learning-rate", str(a.learning_rate),
           "--max-new-tokens", str(a.max_new_tokens), "--output-dir", str(out / f"{tag}-out"), "--seed", str(seed),
           # loraflow's rules: every side computes alike (`--peer-bf16` forces the other sides' autocast on or off)
           "--compute-dtype", resolve_compute_dtype("auto"), "--bf16" if peer_bf16(a) else "--no-bf16", *extra]
    proc = run_measured(cmd, env, out / f"{tag}.log")
    return {**proc, **json.loads(result.read_text())}


def start_server(work: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    from loraflow.ops.up import _health

    port = 4300 + os.getpid() % 500
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=open(work / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not _health(env["PREFECT_API_URL"], None):
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit(f"error: the Prefect server did not start: see {work / 'server.log'}")
        time.sleep(1)
    return server, env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["scitldr", "aclsum"])
    p.add_argument("--model", default="smollm2-gguf", help="model.name_or_path (the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--train-examples", type=int, default=256)
    p.add_argument("--validation-examples", type=int, default=32)
    p.add_argument("--test-examples", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch-size", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="the draw of the rows (one for every side and training seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="training seeds, paired across sides (data order and LoRA initialisation)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES)
    p.add_argument("--naive", action="store_true", help="also run the naive script, once per dataset")
    p.add_argument("--peer-bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for the script and TRL: auto = as loraflow's train.bf16: auto decides here")
    p.add_argument("--loraflow-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a `loraflow run --set` override for the loraflow side (repeatable)")
    p.add_argument("--carve-validation", action="store_true",
                   help="write no validation.jsonl: loraflow carves its validation split out of train (the old setup)")
    p.add_argument("--like-for-like", type=int, default=1, metavar="N",
                   help="memory rows with gradient checkpointing forced on, then off, on every side, over the first N "
                        "seeds (0: none); summary.json's loraflow_over_trl_like_for_like")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args(argv)

    from benchmarks.flops import model_shape
    from loraflow.hardware import machine, matmul_peaks
    from benchmarks.report import markdown, summary
    from loraflow.store.sources import resolve_model_dir

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    model_dir = str(resolve_model_dir(a.model, None, None, False))
    report: dict = {"date": dt.date.today().isoformat(), "machine": machine(), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "datasets": {}}
    report["matmul_peaks"] = matmul_peaks()
    report["model_shape"] = model_shape(model_dir)
    server, env = start_server(a.work)
    try:
        for name in a.datasets:
            out = a.work / name
            data_dir = out / "data"
            stats = write_examples(name, model_dir, data_dir, a.train_examples, a.test_examples, a.max_length, a.seed,
                                   a.validation_examples)
            if a.carve_validation:
                (data_dir / "validation.jsonl").unlink()
                stats["n_validation"] = "carved from train by loraflow"
            print(f"{name}: {stats}", flush=True)
            runs: dict[str, list] = {side: [] for side in [*a.sides, *(["baseline-naive"] if a.naive else [])]}
            sides = {
                "baseline": lambda s: script_side("baseline.py", f"baseline-{s}", data_dir, out, model_dir, name, a, env, s),
                "trl": lambda s: script_side("trl_peer.py", f"trl-{s}", data_dir, out, model_dir, name, a, env, s,
                                             "--eval-batch-size", str(a.eval_batch_size)),
                "loraflow": lambda s: loraflow_side(name, data_dir, out, a, env, s),
                "baseline-naive": lambda s: script_side("baseline.py", "baseline-naive", data_dir, out, model_dir, name,
                                                        a, env, s, "--variant", "naive"),
            }
            for r, seed in enumerate(a.seeds):
                order = a.sides[r % len(a.sides):] + a.sides[:r % len(a.sides)]  # rotated: no side always runs first
                if r == 0 and a.naive:
                    order = order + ["baseline-naive"]
                for side in order:
                    result = sides[side](seed)
                    runs[side].append(result)
                    wall = result["cold"]["wall_s"] if side == "loraflow" else result["wall_s"]
                    print(f"{name}: {side} (seed {seed}) done in {wall} s", flush=True)
            like: dict[str, dict[str, list]] = {}
            for setting in ("on", "off") if a.like_for_like else ():
                like[setting] = {side: [] for side in a.sides}
                for r, seed in enumerate(a.seeds[:a.like_for_like]):
                    for side in a.sides[r % len(a.sides):] + a.sides[:r % len(a.sides)]:
                        result = (loraflow_side(name, data_dir, out, a, env, seed, setting) if side == "loraflow" else
                                  script_side(f"{'baseline' if side == 'baseline' else 'trl_peer'}.py",
                                              f"{side}-{seed}-checkpointing-{setting}", data_dir, out, model_dir, name,
                                              a, env, seed, "--gradient-checkpointing", setting,
                                              *(["--eval-batch-size", str(a.eval_batch_size)] if side == "trl" else [])))
                        like[setting][side].append(result)
                        print(f"{name}: {side} (seed {seed}, checkpointing {setting}) done", flush=True)
            test = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
            report["datasets"][name] = {"data": stats, "seeds": a.seeds, **runs, "like_for_like": like,
                                        "references": [r["target"] for r in test], "clusters": [r["input"][:200] for r in test]}
    finally:
        server.terminate()
        server.wait(timeout=60)
    report["matmul_peaks_after"] = matmul_peaks()
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{report['date']}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    (a.results / "summary.json").write_text(json.dumps(summary(report), indent=2) + "\n")
    print(markdown(report))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
