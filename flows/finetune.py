"""The fine-tune flow: data -> tokenize -> model -> train -> evaluate (-> export, with export.enabled).

Its one parameter is the whole validated config, so the Prefect UI renders a nested form with
descriptions and choices. Each stage is a cached task: a rerun recomputes only what changed.
In a deployment run, the parameter overrides the deployment's config field by field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from flows.pipeline import export_stage, resolve_config, run_stages
from loraflow import store
from loraflow.store.artifacts import Handle
from loraflow.config import PipelineConfig, default_config
from loraflow.stages.export import wanted
from loraflow.store.remote import is_url, remote_folder
from loraflow.ops.tracking import flow_run_tracking
from loraflow.ops.report import results_table
from tasks.reporting import publish_results
from tasks.stages import workspace


@flow(name="loraflow-finetune")
def finetune(cfg: PipelineConfig = default_config()) -> dict[str, Any]:
    """QLoRA fine-tune a causal LM and score it with ROUGE against its base model."""
    cfg = resolve_config(cfg)
    with flow_run_tracking(cfg, "finetune") as tracker, store.reading_run(workspace(cfg.run)):  # MLflow, when train.report_to has it
        stages = run_stages(cfg)
        publish_results(stages.scores.info, stages.scores.path, stages.trained.path)
        adapter = str(Path(stages.trained.path) / "adapter")
        logger = get_run_logger()
        logger.info("%s", results_table(stages.scores.info))
        logger.info("adapter: %s", adapter)
        export = export_stage(cfg, stages) if wanted(cfg.export, "finetune") else None
        if tracker is not None:
            tracker.log_results(stages)
            if export is not None:
                tracker.log_export(export)
            logger.info("MLflow run: %s", tracker.url)
    urls = {"adapter_url": remote_folder(cfg.run.output_dir, "train", stages.trained.fingerprint) + "/adapter"} \
        if is_url(cfg.run.output_dir) else {}
    return {
        "adapter": adapter,
        **urls,
        "metrics": stages.scores.info,
        "metrics_file": str(Path(stages.scores.path) / "metrics.json"),
        "export": export_summary(export),
        "mlflow_run_id": tracker.run_id if tracker else None,
        "train": stages.trained.info,
        "stages": {h.stage: h.fingerprint for h in stages.all()},
        "stages_paths": {h.stage: h.path for h in stages.all()},
    }


def export_summary(export: Handle | None) -> dict[str, Any] | None:
    """The export's files (absolute paths), sizes and parity, for the flow's result."""
    if export is None:
        return None
    return {"path": export.path, "files": {k: str(Path(export.path) / v) for k, v in export.info["files"].items()},
            "size_mb": export.info["size_mb"], "parity": export.info["parity"]}
