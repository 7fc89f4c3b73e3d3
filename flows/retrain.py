"""Scheduled retraining with champion/challenger promotion.

Runs the same cached stages as `loraflow-finetune`. When the data (and config) are those the champion
was trained on, every stage is a cache hit and the run says so in seconds. Otherwise the new adapter
(the challenger) is trained and evaluated, the champion is scored on the *same* test examples, and
the challenger is promoted only if it beats the champion by `promotion.margin` on
`promotion.metric`. Every decision is recorded in the registry (see `loraflow.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from flows.pipeline import Stages, resolve_config, run_stages, stage
from loraflow.artifacts import Handle
from loraflow.config import PipelineConfig, default_config
from loraflow.registry import Candidate, Registry, decide
from loraflow.remote import is_url
from tasks.reporting import publish_results
from tasks.stages import evaluate_task


def _champion_scores(cfg: PipelineConfig, stages: Stages, champion: Candidate) -> dict[str, float] | None:
    """The champion's ROUGE on this run's test examples (a cached evaluate task of its adapter)."""
    train_dir = Path(champion.adapter).parent
    if not (train_dir / "adapter" / "adapter_config.json").is_file():
        get_run_logger().warning("champion %s: adapter %s is gone; the challenger is compared with nothing",
                                 champion.id, champion.adapter)
        return None
    quick = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"compare_base": False})})
    handle = Handle(stage="train", path=str(train_dir), fingerprint=champion.train_fingerprint, info={})
    scored = stage(evaluate_task, quick, stages.storage, quick, stages.tokenized, stages.model, handle)
    return scored.info["finetuned"]


def _already_decided(registry: Registry, stages: Stages, champion: Candidate | None, margin: float) -> Candidate | None:
    """The earlier rejection of this very challenger against this champion with this margin, if any."""
    for c in reversed(registry.read().candidates):
        if (c.train_fingerprint == stages.trained.fingerprint and c.champion_id == (champion.id if champion else None)
                and c.margin == margin and not c.promoted):
            return c
    return None


@flow(name="loraflow-retrain")
def retrain(cfg: PipelineConfig = default_config()) -> dict[str, Any]:
    """Retrain on the current data; promote the new adapter only if it beats the champion."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    cfg = resolve_config(cfg)
    if cfg.promotion.registry_dir is None and is_url(cfg.run.output_dir):
        raise ValueError(f"promotion.registry_dir: run.output_dir is a URL ({cfg.run.output_dir}); set "
                         "promotion.registry_dir to a folder every retraining run can see, e.g. /shared/registry")
    registry = Registry(cfg.promotion.registry_dir or Path(cfg.run.output_dir) / "registry")
    stages = run_stages(cfg)
    metric, margin = cfg.promotion.metric, cfg.promotion.margin
    key = f"{metric}_fmeasure"
    champion = registry.champion()
    score = stages.scores.info["finetuned"][key]

    if champion is not None and champion.train_fingerprint == stages.trained.fingerprint:
        decision, promoted = (f"unchanged: data fingerprint {stages.data.fingerprint} and config are those champion "
                              f"{champion.id} was trained on; every stage was cached, nothing to promote"), False
        champion_scores = stages.scores.info["finetuned"]
    elif (seen := _already_decided(registry, stages, champion, margin)) is not None:
        decision, promoted = f"unchanged since candidate {seen.id} was judged: {seen.reason} (kept: rejected)", False
        champion_scores = _champion_scores(cfg, stages, champion) if champion is not None else None
    else:
        champion_scores = _champion_scores(cfg, stages, champion) if champion is not None else None
        champion_score = champion_scores[key] if champion_scores else None
        promoted, reason = decide(metric, margin, score, champion, champion_score)
        entry = Candidate(
            flow_run_id=str(flow_run.id) if flow_run.id else None,
            adapter=str(Path(stages.trained.path) / "adapter"),
            train_fingerprint=stages.trained.fingerprint, data_fingerprint=stages.data.fingerprint,
            test_fingerprint=stages.tokenized.fingerprint, metric=metric, margin=margin, score=score,
            champion_id=champion.id if champion else None, champion_score=champion_score,
            promoted=promoted, reason=reason,
        )
        registry.record(entry)
        decision = f"{'promoted' if promoted else 'rejected'} challenger {entry.id}: {reason}"
    logger.info("retrain: %s", decision)
    publish_results(stages.scores.info, stages.scores.path, stages.trained.path,
                    champion=champion_scores, decision=decision)
    state = registry.read()
    return {
        "decision": decision,
        "promoted": promoted,
        "champion": state.get(state.champion).model_dump() if state.champion else None,
        "n_candidates": len(state.candidates),
        "metrics": stages.scores.info,
        "stages": {h.stage: h.fingerprint for h in stages.all()},
    }
