"""The five stages as Prefect tasks: thin wrappers that add names, caching, retries and logs.

Each task calls a plain function from `loraflow` and returns a small `Handle`; models, tokenizers
and datasets never travel between tasks.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.logging import get_run_logger

from loraflow.artifacts import Handle
from loraflow.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    PipelineConfig,
    PromptConfig,
    QuantizationConfig,
    RunConfig,
)
from tasks.caching import stage_key


@contextmanager
def run_logs() -> Iterator[None]:
    """Forward the library's `loraflow` log records into this task run's Prefect log."""
    logger = logging.getLogger("loraflow")
    run_logger = get_run_logger()

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            run_logger.log(record.levelno, record.getMessage())

    handler = Forward()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    propagate, logger.propagate = logger.propagate, False  # Prefect's logger already prints to the console
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _key(stage: str, sections: tuple[str, ...], *modules: str):
    """Key on the upstream handles and only the config sections that shape this stage's output."""

    def fn(_ctx: Any, parameters: dict[str, Any]) -> str:
        cfg: PipelineConfig = parameters["cfg"]
        params = {k: v for k, v in parameters.items() if k != "cfg"}
        params.update({name: getattr(cfg, name) for name in sections})
        return stage_key(stage, ("tasks.stages", *modules), params)

    return fn


def _data_key(_ctx: Any, parameters: dict[str, Any]) -> str:
    from loraflow.data import source_fingerprint

    extra = source_fingerprint(parameters["data"])
    return stage_key("data", ("tasks.stages", "loraflow.data", "loraflow.aclsum"), parameters, extra)


def _model_source_key(model: ModelConfig) -> Any:
    from loraflow.sources import source_identity

    return source_identity(model.name_or_path, model.revision)


def _tokenize_key(_ctx: Any, parameters: dict[str, Any]) -> str:
    extra = _model_source_key(parameters["model"])
    mods = ("tasks.stages", "loraflow.prompts", "loraflow.tokenization")
    return stage_key("tokenize", mods, {k: v for k, v in parameters.items() if k != "run"}, extra)


def _model_key(_ctx: Any, parameters: dict[str, Any]) -> str:
    extra = _model_source_key(parameters["model"])
    mods = ("tasks.stages", "loraflow.modeling", "loraflow.sources")
    return stage_key("model", mods, {k: v for k, v in parameters.items() if k != "run"}, extra)


@task(name="data", cache_policy=CacheKeyFnPolicy(cache_key_fn=_data_key), persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=10)
def data_task(data: DataConfig, run: RunConfig) -> Handle:
    """Load, map, validate and split the dataset."""
    from loraflow.data import prepare_data

    with run_logs():
        handle = prepare_data(data, run.output_dir)
        get_run_logger().info("data: %s train / %s test examples", handle.info.get("n_train"), handle.info.get("n_test"))
        return handle


@task(name="tokenize", cache_policy=CacheKeyFnPolicy(cache_key_fn=_tokenize_key), persist_result=True, result_serializer="json")
def tokenize_task(data: Handle, prompt: PromptConfig, model: ModelConfig, run: RunConfig) -> Handle:
    """Render prompts, tokenize, mask the prompt out of the labels."""
    from loraflow.sources import resolve_model_dir
    from loraflow.tokenization import tokenize_data

    with run_logs():
        tokenizer_dir = resolve_model_dir(model.name_or_path, model.revision, run.cache_dir)
        return tokenize_data(data, prompt, tokenizer_dir, run.output_dir)


@task(name="model", cache_policy=CacheKeyFnPolicy(cache_key_fn=_model_key), persist_result=True, result_serializer="json", retries=1)
def model_task(model: ModelConfig, quantization: QuantizationConfig, lora: LoraConfig, run: RunConfig) -> Handle:
    """Load the base model in 4 bits, attach LoRA, save the initial adapter."""
    from loraflow.modeling import build_model

    with run_logs():
        return build_model(model, quantization, lora, run.output_dir, run.cache_dir)


@task(
    name="train",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_key("train", ("model", "quantization", "train"), "loraflow.training", "loraflow.collator", "loraflow.modeling", "loraflow.launch", "loraflow.worker")),
    persist_result=True,
    result_serializer="json",
)
def train_task(cfg: PipelineConfig, tokenized: Handle, model: Handle) -> Handle:
    """Fine-tune the LoRA adapter with transformers.Trainer, in a child process."""
    from loraflow.launch import run_train_worker

    with run_logs():
        return run_train_worker(cfg, tokenized, model, cfg.run.output_dir)


@task(
    name="evaluate",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_key("evaluate", ("model", "quantization", "eval"), "loraflow.evaluation", "loraflow.rouge")),
    persist_result=True,
    result_serializer="json",
)
def evaluate_task(cfg: PipelineConfig, tokenized: Handle, model: Handle, trained: Handle) -> Handle:
    """Generate on the test split and score ROUGE for the fine-tuned and base models."""
    from loraflow.evaluation import evaluate_adapter

    with run_logs():
        return evaluate_adapter(cfg, tokenized, model, trained, cfg.run.output_dir)
