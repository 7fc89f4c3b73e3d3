"""`loraflow` command line: run the flow, or validate a config without loading anything heavy.

    loraflow run [CONFIG] [--set train.learning_rate=1e-4 ...]
    loraflow validate CONFIG [--set ...]
    loraflow export [CONFIG] [--set ...] [--format merged|gguf|both]
    loraflow watch SOURCE [--every 60s] [--quiet 10s] [--name NAME]
    loraflow emit-data-updated SOURCE [--name NAME]
    loraflow show-config [CONFIG] [--set ...]
    loraflow sweep [CONFIG] --grid train.learning_rate=1e-4,2e-4 --grid lora.r=4,8 [--max-concurrent 2]
    loraflow cache ls|why|gc [CONFIG] [--set ...] [--older-than 7d | --keep-last N] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loraflow.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _prefect_defaults() -> None:
    """Settings that make the no-server (ephemeral) mode work offline on slow machines."""
    # A fresh Prefect home runs ~20 s of database migrations; the default 20 s start-up timeout fails.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from loraflow.ops.tempserver import LEASE_STORAGE

    # Concurrency leases in files: a slot a killed run holds can be found and released (`tasks.slots`).
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)


INTERRUPTED = ("interrupted: the run is recorded as crashed and training saved a checkpoint where it could; "
               "rerun the same command to resume")


@contextmanager
def ctrl_c_stops() -> Iterator[None]:
    """Ctrl-C ends the run even when Python drops the KeyboardInterrupt: one raised inside a finalizer or a weakref
    callback is printed as "ignored" and lost, and the run went on. Until the block is left, the interrupt is
    raised again every few seconds."""
    import signal
    import threading
    import time

    state = {"interrupted": False, "left": False}

    def again() -> None:
        while True:
            time.sleep(3)
            if state["left"]:
                return
            os.kill(os.getpid(), signal.SIGINT)

    def on_sigint(signum, frame) -> None:
        if not state["interrupted"]:
            state["interrupted"] = True
            threading.Thread(target=again, name="loraflow-ctrl-c", daemon=True).start()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        state["left"] = True
        signal.signal(signal.SIGINT, previous)


@contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API the flows use: PREFECT_API_URL's, or a temporary server of our own that a Ctrl-C in the
    terminal does not kill before the flow has recorded how it ended (`loraflow.ops.tempserver`)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from loraflow.ops.tempserver import temporary_server

    with temporary_server(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])):
        yield


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraflow", description="LoRA/QLoRA fine-tuning as a Prefect flow.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("run", "run the fine-tune flow (default config: the offline demo)"),
        ("validate", "pre-flight: check a config, its data, tokenizer and prompts without loading weights"),
        ("show-config", "print the fully resolved config as YAML"),
        ("export", "export the config's run (cached stages reused, missing ones computed) as a merged model and/or GGUF, "
                   "parity-checked against the evaluated model"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", nargs="?", help=f"YAML preset (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field by dotted key, e.g. --set train.max_steps=10 (repeatable)")
        if name == "export":
            s.add_argument("--format", choices=["merged", "gguf", "both"],
                           help="what to write (default: the config's export.format)")
        if name == "validate":
            s.add_argument("--config-only", action="store_true",
                           help="check the config's fields and types only (no data, tokenizer or model files read)")
            s.add_argument("--probe", action="store_true",
                           help="also run one real training step on two examples: seconds per step and the total")
    sw = sub.add_parser("sweep", help="run one fine-tune child run per combination of --grid values, ranked by ROUGE")
    sw.add_argument("config", nargs="?", help=f"base YAML preset (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="values to sweep for a dotted key, parsed like --set values, e.g. --grid lora.r=4,8 (repeatable: "
                    "every combination runs)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the base config for every run (repeatable)")
    sw.add_argument("--max-concurrent", type=int, default=2, help="child runs at once (default: 2)")
    sw.add_argument("--metric", choices=["rouge1", "rouge2", "rougeL", "rougeLsum"], default="rougeL",
                    help="fine-tuned ROUGE F1 that ranks the runs (default: rougeL)")
    c = sub.add_parser("cache", help="the stage store of a config's run.output_dir: ls, why (hit or what differs), gc")
    c.add_argument("action", choices=["ls", "why", "gc"])
    c.add_argument("config", nargs="?", help=f"YAML preset (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field by dotted key, as for `run` (repeatable)")
    c.add_argument("--older-than", metavar="AGE", help="gc: remove stages unused for this long, e.g. 7d, 12h, 30m")
    c.add_argument("--keep-last", type=int, metavar="N", help="gc: keep the N most recently used keys of each stage")
    c.add_argument("--dry-run", action="store_true", help="gc: only say what would be removed")
    w = sub.add_parser("watch", help="emit loraflow.data.updated whenever SOURCE's content changes and has settled "
                                     "(a deployment trigger then starts retraining)")
    w.add_argument("source", help="the data folder or file to watch (as in data.source)")
    w.add_argument("--every", default="60s", help="how often to look (default: 60s)")
    w.add_argument("--quiet", default="10s",
                   help="how long the source must stay unchanged before a change counts (default: 10s)")
    w.add_argument("--name", help="resource name: the event is for loraflow.stages.data.NAME (default: the folder name)")
    e = sub.add_parser("emit-data-updated", help="emit loraflow.data.updated for SOURCE now (for pipelines that "
                                                 "know when they are done writing)")
    e.add_argument("source", help="the data folder or file that changed")
    e.add_argument("--name", help="resource name: the event is for loraflow.stages.data.NAME (default: the folder name)")
    up = sub.add_parser("up", help="start a local Prefect server + worker and deploy deployments/prefect.yaml")
    up.add_argument("--host", default="127.0.0.1", help="server bind address (default: loopback only)")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument("--pool", default="loraflow", help="process work pool name (as in deployments/prefect.yaml)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        _prefect_defaults()
        from loraflow.ops.up import main as up

        return up(args.host, args.port, args.pool)
    if args.command in ("watch", "emit-data-updated"):
        return _events(args)
    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if args.command == "sweep":
        return _sweep(config_path, args)
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "cache":
        from loraflow.cli.cache import main as cache

        try:
            return cache(args.action, cfg, args.older_than, args.keep_last, args.dry_run)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.command == "validate":
        checked_as = f"{config_path or 'the defaults'}" + "".join(f" --set {o}" for o in args.overrides)
        if args.config_only:
            print(f"ok: {checked_as} is a valid loraflow config (fields and types)")
            return 0
        import datasets

        from loraflow.stages.preflight import run_checks

        datasets.disable_progress_bars()  # the report is the output
        report = run_checks(cfg, checked_as, probe=args.probe)
        print(report.text())
        return 1 if report.errors else 0
    if args.command == "show-config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0

    if args.command == "export":
        update = {"enabled": True, **({"format": args.format} if args.format else {})}
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update=update)})
    _prefect_defaults()
    from loraflow.stages.launch import WorkerFailed, prestart, retire_prestarted

    try:
        prestart(cfg)  # the training process imports torch while this one imports Prefect and starts the run
        from flows.finetune import finetune

        with prefect_api(), ctrl_c_stops():
            result = finetune(cfg)
    except (ValueError, FileNotFoundError, PermissionError, WorkerFailed) as err:
        # Our own errors are one line that says what to do; don't bury them under a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        retire_prestarted()  # not adopted by the run (a cache hit, or it stopped before training)
    from loraflow.ops.report import results_table

    print(results_table(result["metrics"]))
    print(f"adapter: {result['adapter']}\nmetrics: {result['metrics_file']}")
    if result.get("export"):
        from loraflow.ops.report import export_table

        print(export_table(result["export"]))
    print(json.dumps({"adapter": result["adapter"], "stages": result["stages"]}, indent=2))
    return 0


def _events(args: argparse.Namespace) -> int:
    from loraflow.ops.events import WatchError, emit_data_updated, parse_seconds, watch

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            print("error: events go to a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api, "
                  "as `loraflow up` prints)", file=sys.stderr)
            return 2
    try:
        if args.command == "emit-data-updated":
            if not Path(args.source).expanduser().exists():
                raise WatchError(f"emit-data-updated: '{args.source}' does not exist: pass the data folder or file")
            event = emit_data_updated(args.source, args.name)
            print(f"emitted {event.event} for {event.resource.id}: fingerprint {event.payload['fingerprint']}")
            return 0
        watch(args.source, parse_seconds(args.every), parse_seconds(args.quiet), args.name)
    except WatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _sweep(config_path: Path | None, args: argparse.Namespace) -> int:
    from loraflow.ops.sweep import parse_grid_arg, plan_sweep, ranking_rows, ranking_text

    grid: dict[str, list] = {}
    try:
        cfg = load_config(config_path, args.overrides)
        for item in args.grid:
            key, values = parse_grid_arg(item)
            if key in grid:
                raise ConfigError(f"--grid {key} is given twice: list all its values in one, e.g. --grid {key}=a,b")
            grid[key] = values
        if args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1 (got {args.max_concurrent})")
        plan_sweep(cfg, grid)  # every child validated before Prefect starts
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    _prefect_defaults()
    from flows.sweep import sweep

    try:
        with prefect_api(), ctrl_c_stops():
            result = sweep(cfg, grid=grid, max_concurrent=args.max_concurrent, metric=args.metric)
    except (ValueError, RuntimeError, FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)  # e.g. every child failed: the first one's error
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    print(f"sweep ranking by fine-tuned {args.metric} F1 (x100):")
    print(ranking_text(ranking_rows(result["ranking"])))
    if result["failed"]:
        print(f"warning: {len(result['failed'])} of {len(result['ranking'])} runs failed: "
              f"{', '.join(result['failed'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
