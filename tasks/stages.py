"""The five stages (and the optional export) as Prefect tasks: thin wrappers that add names, caching, retries and logs.

Each task receives its stage's key (`key`: computed once per run by `flows.pipeline.run_stages`) and asks the
store once (`store.build`: a hit is reused; a miss runs the stage's plain `run(config sections, inputs, out)`
into a temporary folder that becomes the key's folder), and returns a small `Handle`; models, tokenizers and
datasets never travel between tasks. The train stage keeps checkpoints to resume from, so it has its own folder
protocol (`loraflow.stages.launch`), given its key the same way.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from loraflow import store
from loraflow.store.artifacts import Handle, default_cache_dir
from loraflow.config import DataConfig, LoraConfig, ModelConfig, PipelineConfig, PromptConfig, QuantizationConfig, RunConfig
from loraflow.store.remote import local_root
from tasks.caching import cache_key_fn, explain_miss
from loraflow.store.locks import STALE_SECONDS, AtomicFileLockManager
from tasks.slots import holding
from tasks.storage import lock_folder


@contextmanager
def stage_logs(stage: str, output_dir: str) -> Iterator[None]:
    """Log why the stage runs (a cache miss), and forward `loraflow` log records into the task's log."""
    run_logger = get_run_logger()
    run_logger.info("%s: miss — %s", stage, explain_miss(stage, TaskRunContext.get().parameters, output_dir))
    logger = logging.getLogger("loraflow")
    thread = threading.get_ident()

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == thread:  # concurrent runs (a sweep's children) keep their own lines
                run_logger.log(record.levelno, record.getMessage())

    handler = Forward()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with _FORWARDING["lock"]:  # the first stage in flight turns propagation off, the last one restores it
        if _FORWARDING["count"] == 0:
            _FORWARDING["propagate"], logger.propagate = logger.propagate, False  # Prefect already prints them
        _FORWARDING["count"] += 1
    try:
        yield
    finally:
        logger.removeHandler(handler)
        with _FORWARDING["lock"]:
            _FORWARDING["count"] -= 1
            if _FORWARDING["count"] == 0:
                logger.propagate = _FORWARDING["propagate"]


# How many stages forward `loraflow` records right now, and the propagation to restore after them.
_FORWARDING: dict[str, Any] = {"lock": threading.Lock(), "count": 0, "propagate": True}


def _policy(stage: str, lock_dir: Path, stale_seconds: float = STALE_SECONDS) -> CacheKeyFnPolicy:
    # SERIALIZABLE + a file lock per cache key: two runs of the same config never compute the same stage
    # at once; the second waits for the first and then reads its cached result (or, if the first was
    # killed, breaks its lock and computes the stage: loraflow.store.locks).
    return CacheKeyFnPolicy(cache_key_fn=cache_key_fn(stage)).configure(
        isolation_level="SERIALIZABLE", lock_manager=AtomicFileLockManager(lock_dir, stale_seconds)
    )


def _options(stage: str, **kw: Any) -> dict[str, Any]:
    policy = _policy(stage, default_cache_dir(None) / "locks")
    return dict(name=stage, cache_policy=policy, persist_result=True, result_serializer="json", **kw)


def workspace(run: RunConfig) -> str:
    """The folder stages write to: run.output_dir, or this machine's mirror when it is a URL."""
    return str(local_root(run.output_dir, run.cache_dir))


def published(handle: Handle, run: RunConfig) -> Handle:
    """The finished stage, uploaded when output_dir is a URL."""
    return store.publish(handle, run.output_dir)


def _retryable(_task: Any, _run: Any, state: Any) -> bool:
    """Retry what a retry can fix (a network failure), not a data error the user must fix."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - the failure being judged
        return bool(getattr(err, "transient", not isinstance(err, ValueError)))
    return True


def for_run(task_obj: Any, run: RunConfig, storage_slug: str | None) -> Any:
    """`task_obj` with this run's result storage and its locks (see `tasks.storage`)."""
    lock_dir = lock_folder(run.output_dir, run.result_storage, default_cache_dir(run.cache_dir))
    return task_obj.with_options(cache_policy=_policy(task_obj.name, lock_dir, run.lock_stale_seconds),
                                 result_storage=storage_slug)


class PreflightError(ValueError):
    """The run's inputs fail a pre-flight check (`loraflow.stages.preflight`); the message names the first and the fix."""


def _preflight_key(_ctx: Any, parameters: dict[str, Any]) -> str | None:
    key = parameters["key"]  # None when the stages' keys could not be computed: the checks say why, uncached
    return None if key is None else f"loraflow-preflight-{key.key}"


@task(name="preflight", cache_policy=CacheKeyFnPolicy(cache_key_fn=_preflight_key), persist_result=True,
      result_serializer="json")
def preflight_task(cfg: PipelineConfig, key: store.StageKey | None, train_key: str | None = None,
                   data_ahead: str | None = None) -> list[str]:
    """The checks `loraflow validate` makes, before any stage: fail in seconds, publish the report as an
    artifact. It reads the data, the tokenizer and the model's config, never weights; a pass is cached under
    everything it read (`store.preflight_key`), a failure is not. In the training process started early for
    `train_key` when there is one (`launch.ask`: this process imports no torch before training), else here.
    `data_ahead`: where the flow builds the splits meanwhile (`data.reserve_ahead`), read if ready in time."""
    from prefect.artifacts import create_markdown_artifact

    from loraflow.stages.preflight import Report, run_checks
    from loraflow.stages.launch import ask

    checked_as = f"the config of flow run {flow_run_name()}"
    asked = ask(train_key, "preflight", {"cfg": cfg.model_dump(mode="json"), "checked_as": checked_as,
                                         "data_ahead": data_ahead})
    report = Report(**asked) if asked is not None else run_checks(cfg, checked_as=checked_as, data_ahead=data_ahead)
    create_markdown_artifact(report.markdown(), key="pre-flight", description=f"Pre-flight checks: {report.summary()}")
    logger = get_run_logger()
    for level, text in report.lines:
        logger.log(logging.ERROR if level == "error" else logging.WARNING if level == "warning" else logging.INFO,
                   "pre-flight: %s", text)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more errors: see the pre-flight artifact)" if len(report.errors) > 1 else ""
        raise PreflightError(f"pre-flight: {report.errors[0]}{more}")
    return report.warnings


def flow_run_name() -> str:
    from prefect.runtime import flow_run

    return flow_run.name or "?"


@task(**_options("data", retries=2, retry_delay_seconds=10, retry_condition_fn=_retryable))
def data_task(data: DataConfig, run: RunConfig, key: store.StageKey) -> Handle:
    """Load, map, validate and split the dataset."""
    from loraflow.stages import data as stage

    with stage_logs("data", workspace(run)):
        return published(store.build(workspace(run), key, run.refreshes("data"), lambda out: stage.run(data, out)), run)


@task(**_options("tokenize"))
def tokenize_task(data: Handle, prompt: PromptConfig, model: ModelConfig, run: RunConfig, key: store.StageKey,
                  train_key: str | None = None) -> Handle:
    """Render prompts, tokenize, mask the prompt out of the labels: in the training process started early for
    `train_key` when there is one (`launch.ask`: the tokenizer imports torch, which this process then never does
    before training), else here."""
    from loraflow.stages import tokenize as stage
    from loraflow.stages.launch import ask

    def build(out: Path) -> dict:
        request = {"data": data.model_dump(), "prompt": prompt.model_dump(mode="json"),
                   "model": model.model_dump(mode="json"), "out": str(out), "cache_dir": run.cache_dir}
        asked = ask(train_key, "tokenize", request)
        return asked if asked is not None else stage.run(data, prompt, model, out, run.cache_dir)

    with stage_logs("tokenize", workspace(run)):
        return published(store.build(workspace(run), key, run.refreshes("tokenize"), build), run)


@task(**_options("model", retries=1))
def model_task(model: ModelConfig, quantization: QuantizationConfig, lora: LoraConfig, run: RunConfig,
               key: store.StageKey, train_key: str | None = None) -> Handle:
    """Load the base model in 4 bits, attach LoRA, save the initial adapter: in the training process started
    early for `train_key` when there is one (`launch.build_model`: loaded once per run), else here."""
    from loraflow.stages import model as stage
    from loraflow.stages.launch import build_model

    def build(out: Path) -> dict:
        return (build_model(train_key, key.key, model, quantization, lora, out, run.cache_dir)
                or stage.run(model, quantization, lora, out, run.cache_dir))

    with stage_logs("model", workspace(run)):
        return published(store.build(workspace(run), key, run.refreshes("model"), build, stage.INFO), run)


@task(**_options("train", tags=["gpu"]))
def train_task(cfg: PipelineConfig, tokenized: Handle, model: Handle, key: store.StageKey,
               train_key: str | None = None) -> Handle:
    """Fine-tune the LoRA adapter with transformers.Trainer, in a child process (given `key`): the one this run
    started early for `train_key` when there is one."""
    from loraflow.stages.launch import run_train_worker
    from tasks.reporting import progress_reporter

    with stage_logs("train", workspace(cfg.run)), holding():
        trained = run_train_worker(cfg, tokenized, model, workspace(cfg.run), key, progress_reporter(cfg.train.max_steps),
                                   early=train_key)
        return published(trained, cfg.run)


@task(**_options("evaluate", tags=["gpu"]))
def evaluate_task(cfg: PipelineConfig, tokenized: Handle, model: Handle, trained: Handle, key: store.StageKey) -> Handle:
    """Generate on the test split and score ROUGE for the fine-tuned and base models."""
    from loraflow.stages import evaluate as stage

    with stage_logs("evaluate", workspace(cfg.run)), holding():
        return published(store.build(workspace(cfg.run), key, cfg.run.refreshes("evaluate"),
                                     lambda out: stage.run(cfg, tokenized, model, trained, out), stage.INFO), cfg.run)


@task(**_options("export", tags=["gpu"]))
def export_task(cfg: PipelineConfig, tokenized: Handle, model: Handle, trained: Handle, scores: Handle,
                key: store.StageKey) -> Handle:
    """Merge the adapter (safetensors and/or GGUF), check parity with the evaluated model, publish."""
    from loraflow.stages import export as stage
    from tasks.reporting import publish_export

    with stage_logs("export", workspace(cfg.run)), holding():
        exported = published(store.build(workspace(cfg.run), key, cfg.run.refreshes("export"),
                                         lambda out: stage.run(cfg, tokenized, model, trained, scores, out), stage.INFO),
                             cfg.run)
    publish_export(exported.info, exported.path)
    return exported
