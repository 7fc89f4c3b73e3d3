"""The fine-tune flow: data -> tokenize -> model -> train -> evaluate.

Its one parameter is the whole validated config, so the Prefect UI renders a nested form with
descriptions and choices. Each stage is a cached task: a rerun recomputes only what changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from loraflow.artifacts import Handle, ensure_writable, verify
from loraflow.config import PipelineConfig
from loraflow.report import results_table
from tasks.stages import data_task, evaluate_task, model_task, tokenize_task, train_task


def _stage(task_obj, cfg: PipelineConfig, *args: Any) -> Handle:
    """Run one cached stage. A cache hit whose artifact folder is gone or fails its checksums is
    never used: it is logged and the stage recomputes (`run.refresh` forces that for all or some stages)."""
    logger = get_run_logger()
    refresh = cfg.run.refresh is True or (isinstance(cfg.run.refresh, list) and task_obj.name in cfg.run.refresh)
    state = task_obj.with_options(refresh_cache=refresh or None)(*args, return_state=True)
    handle: Handle = state.result()
    if state.name == "Cached":
        problem = verify(handle.path)
        if problem is None:
            logger.info("%s: hit — cached %s", handle.stage, handle.path)
            return handle
        logger.warning("%s: cached result unusable (%s): recomputing", handle.stage, problem)
        handle = task_obj.with_options(refresh_cache=True)(*args)
    return handle


def _load_hub_token(secret_name: str | None) -> None:
    """Expose a token from a Prefect Secret block as HF_TOKEN for this run (and the training child)."""
    if not secret_name:
        return
    import os

    from prefect.blocks.system import Secret

    try:
        os.environ["HF_TOKEN"] = Secret.load(secret_name).get()
    except ValueError:
        raise ValueError(
            f"run.hf_token_secret: no Prefect Secret block named '{secret_name}': create it in the UI "
            "(Blocks > Secret) or unset the field to use HF_TOKEN"
        ) from None


@flow(name="loraflow-finetune")
def finetune(cfg: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """QLoRA fine-tune a causal LM and score it with ROUGE against its base model."""
    output_dir = ensure_writable(cfg.run.output_dir)  # fail before any stage, not after training
    _load_hub_token(cfg.run.hf_token_secret)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(output_dir)})})
    data = _stage(data_task, cfg, cfg.data, cfg.run)
    tokenized = _stage(tokenize_task, cfg, data, cfg.prompt, cfg.model, cfg.run)
    model = _stage(model_task, cfg, cfg.model, cfg.quantization, cfg.lora, cfg.run)
    trained = _stage(train_task, cfg, cfg, tokenized, model)
    scores = _stage(evaluate_task, cfg, cfg, tokenized, model, trained)

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
        "stages_paths": {h.stage: h.path for h in (data, tokenized, model, trained, scores)},
    }
