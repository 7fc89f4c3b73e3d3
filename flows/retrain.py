"""Scheduled retraining with champion/challenger promotion.

Runs the same cached stages as `loraflow-finetune`. When the data (and config) are those the champion
was trained on, every stage is a cache hit and the run says so in seconds. Otherwise the new adapter
(the challenger) is trained and evaluated, the champion is re-scored on its *own* base model on the
same validation and test rows, and the challenger is promoted only if the paired validation
comparison on `promotion.metric` clears `promotion.margin` (`promotion.rule`: its 95% lower bound, or
its mean). The test comparison is reported, never decided on. A champion trained on another base
model is not compared (refused with the reason). Every decision is recorded in the registry.
The champion is then exported (`export.enabled: auto`; merged and/or GGUF, parity-checked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from flows.approval import answer, approval_of, ask, check_can_ask
from flows.finetune import export_summary
from flows.pipeline import Stages, export_stage, resolve_config, run_stages, stage
from loraflow import store
from loraflow.store.artifacts import Handle
from loraflow.config import PipelineConfig, default_config
from loraflow.metrics.bootstrap import fmt_interval, paired_bootstrap
from loraflow.stages.export import wanted
from loraflow.ops.registry import Candidate, DataEvent, Registry, base_identity, current_champion, decide
from loraflow.store.remote import is_url
from loraflow.ops.tracking import champion_now, flow_run_tracking, model_name, register_champion
from tasks.reporting import publish_results
from tasks.storage import result_storage_slug
from tasks.stages import evaluate_task, workspace


def _champion_eval(cfg: PipelineConfig, stages: Stages, champion: Candidate) -> Handle | str:
    """The champion scored on this run's validation and test rows (a cached evaluate task of its adapter, on the
    model stage it was trained from), or why it cannot be: its stages are neither on this machine nor in the shared
    store (a URL `run.output_dir` is fetched from, into this worker's mirror)."""
    train = Handle(stage="train", path=str(Path(champion.adapter).parent), fingerprint=champion.train_fingerprint, info={})
    train, problem = store.localize(train, cfg)
    model = stages.model
    if problem is None and champion.model_handle:
        model, problem = store.localize(Handle.model_validate(champion.model_handle), cfg)
    if problem is not None:
        return (f"refused: champion {champion.id} is unavailable on this worker ({problem}); the challenger was not "
                "compared and the champion stays: restore its stages (or point run.output_dir at the store that "
                "holds them) and rerun, or promote by hand")
    quick = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"compare_base": False})})
    key = store.evaluate_key(quick, stages.tokenized.fingerprint, model.fingerprint, train.fingerprint)
    return stage(evaluate_task, quick, stages.storage, quick, stages.tokenized, model, train, key)


def _row_scores(eval_dir: str, split: str, key: str) -> tuple[list[float], list[str]]:
    """Per-row `key` F1 of the fine-tuned model and the rows' clusters, from the evaluate stage's files."""
    name = "validation_predictions.jsonl" if split == "validation" else "predictions.jsonl"
    rows = [json.loads(line) for line in (Path(eval_dir) / name).read_text().splitlines()]
    return [r["prediction_scores"][key] for r in rows], [r["cluster"] for r in rows]


def _paired(ours: Handle, theirs: Handle, split: str, key: str, cfg: PipelineConfig) -> dict[str, Any]:
    a, clusters = _row_scores(ours.path, split, key)
    b, _ = _row_scores(theirs.path, split, key)
    return paired_bootstrap(a, b, clusters, cfg.eval.bootstrap_samples, cfg.eval.bootstrap_seed)


def _base_of(cfg: PipelineConfig) -> dict[str, Any]:
    return {"model": cfg.model.model_dump(mode="json"), "quantization": cfg.quantization.model_dump(mode="json"),
            "lora": cfg.lora.model_dump(mode="json")}


def refusal(champion: Candidate | None, base: dict[str, Any]) -> str | None:
    """Why the challenger cannot be compared with the champion (another base model), or None."""
    if champion is None or champion.base is None or base_identity(champion.base) == base_identity(base):
        return None
    return (f"refused: champion {champion.id} was trained on {base_identity(champion.base)}, this run on "
            f"{base_identity(base)}; adapters on different base models are not compared: promote by hand")


def _already_decided(registry: Registry, stages: Stages, champion: Candidate | None, cfg: PipelineConfig) -> Candidate | None:
    """The earlier rejection of this very challenger against this champion by the same rule, if any."""
    p = cfg.promotion
    for c in reversed(registry.read().candidates):
        if (c.train_fingerprint == stages.trained.fingerprint and c.champion_id == (champion.id if champion else None)
                and c.margin == p.margin and c.rule == p.rule and c.metric == p.metric and not c.promoted
                and not c.awaiting()):  # a pending approval is not a judgement yet (`flows.approval`)
            return c
    return None


def _note_trigger(cfg: PipelineConfig, data_event: DataEvent | None) -> None:
    """Log which data event started this run, and whether the data is still what the event announced."""
    if data_event is None:
        return
    from loraflow.store.sources import is_local
    from loraflow.ops.events import content_fingerprint

    logger = get_run_logger()
    logger.info("triggered by loraflow.data.updated %s for %s (fingerprint %s, emitted %s)", data_event.event_id,
                data_event.source, data_event.fingerprint, data_event.occurred)
    if not is_local(cfg.data.source):
        return
    if Path(cfg.data.source).expanduser().resolve() != Path(data_event.source).expanduser().resolve():
        logger.warning("the event is for %s but this run reads data.source=%s: it trains on the latter",
                       data_event.source, cfg.data.source)
    elif content_fingerprint(cfg.data.source) != data_event.fingerprint:
        logger.info("the data changed again since the event: this run trains on the newer content")


@flow(name="loraflow-retrain")
def retrain(cfg: PipelineConfig = default_config(), data_event: DataEvent | None = None) -> dict[str, Any]:
    """Retrain on the current data; promote the new adapter only if it beats the champion. `data_event`: the
    `loraflow.data.updated` event that started the run, when a deployment trigger did."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    cfg = resolve_config(cfg)
    check_can_ask(cfg)
    if cfg.promotion.registry_dir is None and is_url(cfg.run.output_dir):
        raise ValueError(f"promotion.registry_dir: run.output_dir is a URL ({cfg.run.output_dir}); set "
                         "promotion.registry_dir to a folder every retraining run can see, e.g. /shared/registry")
    registry = Registry(cfg.promotion.registry_dir or Path(cfg.run.output_dir) / "registry")
    registry.expire()  # approvals that timed out are recorded as rejections
    asked = registry.asked_by(str(flow_run.id)) if flow_run.id else None
    champion_scores = None
    with flow_run_tracking(cfg, "retrain") as tracker, store.reading_run(workspace(cfg.run)):  # MLflow, when train.report_to has it
        if asked is not None:  # resumed after suspending for approval: decide on the challenger it asked about
            stages = Stages(**{k: Handle.model_validate(v) for k, v in asked.approval.stages.items()},
                            storage=result_storage_slug(cfg.run.result_storage) if cfg.run.result_storage else None)
            promoted, reason, entry = answer(registry, asked, cfg)
            decision = f"{'promoted' if promoted else 'rejected'} challenger {entry.id}: {reason}"
        else:
            _note_trigger(cfg, data_event)
            stages = run_stages(cfg)
            decision, promoted, champion_scores = _judge(cfg, registry, stages, data_event)
        logger.info("retrain: %s", decision)
        publish_results(stages.scores.info, stages.scores.path, stages.trained.path,
                        champion=champion_scores, decision=decision)
        state = registry.read()
        if tracker is not None:
            tracker.log_results(stages)
            tracker.client.set_tag(tracker.run_id, "loraflow.decision", decision[:5000])
            if promoted and cfg.promotion.registry == "mlflow":
                version = register_champion(cfg, tracker, state.get(state.champion))
                logger.info("MLflow: %s version %s is the champion", model_name(cfg), version)
        champion = current_champion(cfg, registry)  # one source: the registry's pointer, or with registry=mlflow the alias
        is_champion = champion is not None and champion.train_fingerprint == stages.trained.fingerprint
        # the champion's export (a rerun after a failed export retries it; a cached one is a hit)
        export = export_stage(cfg, stages) if wanted(cfg.export, "retrain", is_champion) else None
        if tracker is not None and export is not None:
            tracker.log_export(export)
    return {
        "decision": decision,
        "promoted": promoted,
        "champion": champion.model_dump() if champion else None,
        "n_candidates": len(state.candidates),
        "approval": approval_of(state, stages),
        "export": export_summary(export),
        "mlflow_run_id": tracker.run_id if tracker else None,
        "metrics": stages.scores.info,
        "stages": {h.stage: h.fingerprint for h in stages.all()},
    }


def _judge(cfg: PipelineConfig, registry: Registry, stages: Stages,
           data_event: DataEvent | None) -> tuple[str, bool, dict[str, Any] | None]:
    """Compare this run's adapter with the champion and record the decision: (decision, promoted, champion's
    test scores). With promotion.require_approval a promotion first waits for a person (`flows.approval`)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    p = cfg.promotion
    key = f"{p.metric}_fmeasure"
    champion = current_champion(cfg, registry)
    if champion is not None and champion.train_fingerprint == stages.trained.fingerprint:
        return (f"unchanged: data fingerprint {stages.data.fingerprint} and config are those champion {champion.id} "
                "was trained on; every stage was cached, nothing to promote"), False, None
    if (seen := _already_decided(registry, stages, champion, cfg)) is not None:
        return f"unchanged since candidate {seen.id} was judged: {seen.reason} (kept: rejected)", False, None
    base = _base_of(cfg)
    champ_eval = validation = test = None
    if (refused := refusal(champion, base)) is not None:
        promoted, reason = False, refused
    else:
        champ_eval = _champion_eval(cfg, stages, champion) if champion is not None else None
        if isinstance(champ_eval, str):  # a champion this worker cannot score is never replaced unseen
            logger.warning("%s", champ_eval)
            promoted, reason, champ_eval = False, champ_eval, None
        else:
            if champ_eval is not None:
                validation = _paired(stages.scores, champ_eval, "validation", key, cfg)
                test = _paired(stages.scores, champ_eval, "test", key, cfg)
            promoted, reason = decide(p.metric, p.margin, p.rule, champion, validation)
    entry = Candidate(
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        adapter=str(Path(stages.trained.path) / "adapter"),
        train_fingerprint=stages.trained.fingerprint, data_fingerprint=stages.data.fingerprint,
        test_fingerprint=stages.tokenized.fingerprint, metric=p.metric, margin=p.margin, rule=p.rule,
        score=stages.scores.info["validation"]["finetuned"][key], test_score=stages.scores.info["finetuned"][key],
        champion_id=champion.id if champion else None,
        champion_score=champ_eval.info["validation"]["finetuned"][key] if champ_eval else None,
        validation=validation, test=test, base=base, model_handle=stages.model.model_dump(mode="json"),
        trigger=data_event, promoted=promoted, reason=reason,
    )
    if promoted and p.require_approval:  # the rule says promote; a person says whether (the run suspends here)
        promoted, reason, entry = ask(registry, entry, champion, champ_eval.info["finetuned"][key] if champ_eval else None,
                                      stages, cfg)
    else:
        entry = registry.record(entry, champion_now(cfg))  # compare-and-set: the champion it was compared with
        promoted, reason = entry.promoted, entry.reason
    decision = f"{'promoted' if promoted else 'rejected'} challenger {entry.id}: {reason}"
    if test is not None:
        decision += f"; on test (reported, not decided on): {fmt_interval(test)}"
    return decision, promoted, champ_eval.info["finetuned"] if champ_eval else None
