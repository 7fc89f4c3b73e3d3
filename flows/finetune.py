"""The fine-tune flow: data -> tokenize -> model -> train -> evaluate.

Its one parameter is the whole validated config, so the Prefect UI renders a nested form with
descriptions and choices. Each stage is a cached task: a rerun recomputes only what changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from loraflow.config import PipelineConfig
from loraflow.report import results_table
from tasks.stages import data_task, evaluate_task, model_task, tokenize_task, train_task


def _configured(task_obj, cfg: PipelineConfig):
    """Honour `run.refresh`. Cache records and results live in Prefect's result storage
    (PREFECT_LOCAL_STORAGE_PATH, or a storage block via PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK)."""
    return task_obj.with_options(refresh_cache=cfg.run.refresh or None)


@flow(name="loraflow-finetune")
def finetune(cfg: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """QLoRA fine-tune a causal LM and score it with ROUGE against its base model."""
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(Path(cfg.run.output_dir).expanduser().resolve())})})
    data = _configured(data_task, cfg)(cfg.data, cfg.run)
    tokenized = _configured(tokenize_task, cfg)(data, cfg.prompt, cfg.model, cfg.run)
    model = _configured(model_task, cfg)(cfg.model, cfg.quantization, cfg.lora, cfg.run)
    trained = _configured(train_task, cfg)(cfg, tokenized, model)
    scores = _configured(evaluate_task, cfg)(cfg, tokenized, model, trained)

    adapter = str(Path(trained.path) / "adapter")
    logger = get_run_logger()
    logger.info("%s", results_table(scores.info))
    logger.info("adapter: %s", adapter)
    return {
        "adapter": adapter,
        "metrics": scores.info,
        "metrics_file": str(Path(scores.path) / "metrics.json"),
        "train": trained.info,
        "stages": {h.stage: h.fingerprint for h in (data, tokenized, model, trained, scores)},
    }
