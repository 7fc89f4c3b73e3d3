"""The five stages as Prefect tasks: thin wrappers that add names, caching, retries and logs.

Each task calls a plain function from `loraflow` and returns a small `Handle`; models, tokenizers
and datasets never travel between tasks.
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

from loraflow.artifacts import Handle, default_cache_dir
from loraflow.codehash import STAGE_MODULES
from loraflow.config import DataConfig, LoraConfig, ModelConfig, PipelineConfig, PromptConfig, QuantizationConfig, RunConfig
from loraflow.remote import is_url, local_root, remote_folder, upload
from tasks.caching import StageSpec, explain_miss
from tasks.locks import STALE_SECONDS, AtomicFileLockManager
from tasks.storage import lock_folder


def _data_source(parameters: dict[str, Any]) -> Any:
    from loraflow.data import source_fingerprint

    return source_fingerprint(parameters["data"])


def _model_source(parameters: dict[str, Any]) -> Any:
    from loraflow.sources import source_identity

    model = parameters["model"] if isinstance(parameters["model"], ModelConfig) else parameters["cfg"].model
    return source_identity(model.name_or_path, model.revision)


DATA = StageSpec("data", STAGE_MODULES["data"], source=_data_source)
TOKENIZE = StageSpec("tokenize", STAGE_MODULES["tokenize"], source=_model_source)
MODEL = StageSpec("model", STAGE_MODULES["model"], source=_model_source)
# quantization.compute_dtype arrives resolved (flows.pipeline)
TRAIN = StageSpec("train", STAGE_MODULES["train"], sections=("train", "quantization"))
EVALUATE = StageSpec("evaluate", STAGE_MODULES["evaluate"], sections=("eval", "quantization"))
SPECS = {spec.stage: spec for spec in (DATA, TOKENIZE, MODEL, TRAIN, EVALUATE)}


@contextmanager
def stage_logs(spec: StageSpec, output_dir: str) -> Iterator[None]:
    """Log why the stage runs (a cache miss), and forward `loraflow` log records into the task's log."""
    run_logger = get_run_logger()
    run_logger.info("%s: miss — %s", spec.stage, explain_miss(spec, TaskRunContext.get().parameters, output_dir))
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


def _policy(spec: StageSpec, lock_dir: Path, stale_seconds: float = STALE_SECONDS) -> CacheKeyFnPolicy:
    # SERIALIZABLE + a file lock per cache key: two runs of the same config never compute the same stage
    # at once; the second waits for the first and then reads its cached result (or, if the first was
    # killed, breaks its lock and computes the stage: tasks.locks).
    return CacheKeyFnPolicy(cache_key_fn=spec.key).configure(
        isolation_level="SERIALIZABLE", lock_manager=AtomicFileLockManager(lock_dir, stale_seconds)
    )


def _options(spec: StageSpec, **kw: Any) -> dict[str, Any]:
    policy = _policy(spec, default_cache_dir(None) / "locks")
    return dict(name=spec.stage, cache_policy=policy, persist_result=True, result_serializer="json", **kw)


def workspace(run: RunConfig) -> str:
    """The folder stages write to: run.output_dir, or this machine's mirror when it is a URL."""
    return str(local_root(run.output_dir, run.cache_dir))


def published(handle: Handle, run: RunConfig) -> Handle:
    """With a URL output_dir, upload the finished stage folder there (see `loraflow.remote`)."""
    if is_url(run.output_dir):
        upload(Path(handle.path), remote_folder(run.output_dir, handle.stage, handle.fingerprint))
    return handle


def _retryable(_task: Any, _run: Any, state: Any) -> bool:
    """Retry what a retry can fix (a network failure), not a data error the user must fix."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - the failure being judged
        return bool(getattr(err, "transient", not isinstance(err, ValueError)))
    return True


def for_run(task_obj: Any, run: RunConfig, storage_slug: str | None) -> Any:
    """`task_obj` with this run's result storage and its locks (see `tasks.storage`)."""
    spec = SPECS[task_obj.name]
    lock_dir = lock_folder(run.result_storage, default_cache_dir(run.cache_dir))
    return task_obj.with_options(cache_policy=_policy(spec, lock_dir, run.lock_stale_seconds), result_storage=storage_slug)


@task(**_options(DATA, retries=2, retry_delay_seconds=10, retry_condition_fn=_retryable))
def data_task(data: DataConfig, run: RunConfig) -> Handle:
    """Load, map, validate and split the dataset."""
    from loraflow.data import prepare_data

    with stage_logs(DATA, workspace(run)):
        return published(prepare_data(data, workspace(run), refresh=run.refreshes("data")), run)


@task(**_options(TOKENIZE))
def tokenize_task(data: Handle, prompt: PromptConfig, model: ModelConfig, run: RunConfig) -> Handle:
    """Render prompts, tokenize, mask the prompt out of the labels."""
    from loraflow.sources import resolve_model_dir
    from loraflow.tokenization import tokenize_data

    with stage_logs(TOKENIZE, workspace(run)):
        tokenizer_dir = resolve_model_dir(model.name_or_path, model.revision, run.cache_dir, model.allow_pickle_weights)
        return published(tokenize_data(data, prompt, tokenizer_dir, workspace(run), refresh=run.refreshes("tokenize")), run)


@task(**_options(MODEL, retries=1))
def model_task(model: ModelConfig, quantization: QuantizationConfig, lora: LoraConfig, run: RunConfig) -> Handle:
    """Load the base model in 4 bits, attach LoRA, save the initial adapter."""
    from loraflow.modeling import build_model

    with stage_logs(MODEL, workspace(run)):
        return published(build_model(model, quantization, lora, workspace(run), run.cache_dir,
                                     refresh=run.refreshes("model")), run)


@task(**_options(TRAIN, tags=["gpu"]))
def train_task(cfg: PipelineConfig, tokenized: Handle, model: Handle) -> Handle:
    """Fine-tune the LoRA adapter with transformers.Trainer, in a child process."""
    from loraflow.launch import run_train_worker
    from tasks.reporting import progress_reporter

    with stage_logs(TRAIN, workspace(cfg.run)):
        trained = run_train_worker(cfg, tokenized, model, workspace(cfg.run), progress_reporter(cfg.train.max_steps))
        return published(trained, cfg.run)


@task(**_options(EVALUATE, tags=["gpu"]))
def evaluate_task(cfg: PipelineConfig, tokenized: Handle, model: Handle, trained: Handle) -> Handle:
    """Generate on the test split and score ROUGE for the fine-tuned and base models."""
    from loraflow.evaluation import evaluate_adapter

    with stage_logs(EVALUATE, workspace(cfg.run)):
        return published(evaluate_adapter(cfg, tokenized, model, trained, workspace(cfg.run)), cfg.run)
