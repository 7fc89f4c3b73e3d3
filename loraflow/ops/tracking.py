"""Experiment tracking in MLflow (`train.report_to: [..., mlflow]`): one MLflow run per flow run.

The flow opens the run (`flow_run_tracking`) before any stage and logs the resolved config as params and
the Prefect flow run's id and URL as tags; a Prefect link artifact points back at the MLflow run. The
training child gets the run id in its request (`handoff`) and logs the curves live (loss, learning rate,
grad norm, validation metrics) with `loraflow.stages.train.callbacks.mlflow_curves`. After the stages the flow logs the ROUGE scores
with their 95% intervals and n, the adapter, and the export when there is one. A stage that was a cache
hit is listed in the `loraflow.cached_stages` tag; when train was one, its logged curves are replayed from
`trainer_state.json`, and a run whose every stage was cached is tagged `cached=true`.

Only the client is needed (`mlflow-skinny`, the `mlflow` extra); the server runs in its own environment.
The tracking server is `run.mlflow_tracking_uri`, else `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from loraflow.config import PipelineConfig

MLFLOW_SERVER = "mlflow==3.17.2"  # the server the docs and tests run with `uvx --from` (same version as the client)
_CURRENT: contextvars.ContextVar["Tracker | None"] = contextvars.ContextVar("loraflow_mlflow", default=None)


class TrackingError(ValueError):
    """MLflow tracking is asked for but cannot work; the message says what to set or install."""


def enabled(cfg: PipelineConfig) -> bool:
    return "mlflow" in cfg.train.report_to


def tracking_uri(cfg: PipelineConfig) -> str:
    uri = cfg.run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("train.report_to includes mlflow but no tracking server is set: set run.mlflow_tracking_uri "
                            "(e.g. http://127.0.0.1:5000) or MLFLOW_TRACKING_URI")
    return uri


def client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("MLflow tracking needs the MLflow client: `uv sync --extra mlflow` (or pip install "
                            "'loraflow[mlflow]')") from None
    return MlflowClient(tracking_uri=uri)


def params(cfg: PipelineConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, text values (lists and dicts as JSON)."""
    from loraflow.store import flatten

    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in flatten(cfg.model_dump(mode="json")).items()}


class Tracker:
    """The MLflow run of one flow run (made by `flow_run_tracking`)."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self.client = client(uri)
        self.cached: set[str] = set()
        self.ran: set[str] = set()

    @classmethod
    def start(cls, cfg: PipelineConfig, flow: str) -> "Tracker":
        from prefect.runtime import flow_run

        from loraflow.config import redact

        uri = tracking_uri(cfg)
        c = client(uri)
        name = cfg.run.mlflow_experiment or cfg.run.name
        try:
            experiment = c.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else c.create_experiment(name)
        except Exception as err:  # noqa: BLE001 - unreachable server, refused login: one line that says where
            raise TrackingError(f"MLflow at {redact(uri)}: {type(err).__name__}: {str(err).splitlines()[0][:160]}: check "
                                "run.mlflow_tracking_uri / MLFLOW_TRACKING_URI and that the server is up") from None
        tags = {"loraflow.flow": flow, "prefect.flow_run_id": str(flow_run.id or ""),
                "prefect.flow_run_name": str(flow_run.name or ""), "prefect.flow_run_url": str(flow_run.ui_url or "")}
        # A flow run that comes back (resumed after a suspension, or retried) goes on in the MLflow run it opened.
        earlier = c.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'", max_results=1) \
            if flow_run.id else []
        run = earlier[0] if earlier else c.create_run(experiment_id, run_name=flow_run.name or cfg.run.name, tags=tags)
        if earlier:
            c.update_run(run.info.run_id, status="RUNNING")
        tracker = cls(uri, run.info.run_id, experiment_id)
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params(cfg).items())]
        for i in range(0, len(items), 100):
            c.log_batch(tracker.run_id, params=items[i:i + 100])
        tracker._link()
        return tracker

    @property
    def url(self) -> str:
        """The run's page, without any password the tracking URI carries (MLFLOW_TRACKING_URI may): it is logged and
        published as a link artifact."""
        from loraflow.config import redact

        return f"{redact(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def _link(self) -> None:
        from prefect.artifacts import create_link_artifact

        from loraflow.ops.report import artifact_prefix

        if self.uri.startswith(("http://", "https://")):
            create_link_artifact(self.url, link_text=f"MLflow run {self.run_id}", key=f"{artifact_prefix()}-mlflow",
                                 description="This flow run's params, curves, scores and artifacts in MLflow")

    def note(self, stage: str, cached: bool) -> None:
        (self.cached if cached else self.ran).add(stage)

    def log_results(self, stages) -> None:
        """Scores with intervals and n, curves of a cached train, the adapter; the cached tags."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in score_metrics(stages.scores.info).items()]
        if "train" in self.cached:
            metrics += curve_metrics(Path(stages.trained.path))
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])
        self.client.set_tag(self.run_id, "loraflow.cached_stages", ",".join(sorted(self.cached)))
        self.client.set_tag(self.run_id, "cached", str(not self.ran).lower())
        self.client.set_tag(self.run_id, "loraflow.adapter", str(Path(stages.trained.path) / "adapter"))
        self.client.set_tag(self.run_id, "loraflow.train_key", stages.trained.fingerprint)
        self.client.log_artifacts(self.run_id, str(Path(stages.trained.path) / "adapter"), "adapter")
        self.client.log_artifact(self.run_id, str(Path(stages.scores.path) / "metrics.json"), "scores")

    def log_export(self, export) -> None:
        """The export stage's files (merged model, GGUF, parity report) as the run's `export` artifacts."""
        self.client.log_artifacts(self.run_id, export.path, "export")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def score_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """ROUGE F1 (0-1) per system and split, with the 95% interval bounds and n; the paired change over base."""
    out: dict[str, float] = {}
    for split, block in (("test", metrics), ("validation", metrics.get("validation") or {})):
        if not block:
            continue
        out[f"{split}_n"] = float(block["n_examples"])
        for who in ("finetuned", "base"):
            if who not in block:
                continue
            for key, value in block[who].items():
                if key.endswith("_fmeasure"):
                    name = f"{split}_{who}_{key[:-len('_fmeasure')]}"
                    out[name] = float(value)
                    interval = (block.get("intervals") or {}).get(who, {}).get(key)
                    if interval:
                        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = map(float, interval["ci95"])
        for key, paired in (block.get("vs_base") or {}).items():
            name = f"{split}_vs_base_{key[:-len('_fmeasure')]}"
            out[name] = float(paired["mean_diff"])
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = map(float, paired["ci95"])
    return out


def curve_metrics(train_dir: Path) -> list:
    """The numbers the Trainer logged (loss, learning_rate, grad_norm, eval_*), by step (`report.logged_history`)."""
    from mlflow.entities import Metric

    from loraflow.ops.report import logged_history

    history = logged_history(train_dir)
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, int(entry.get("step", 0))) for entry in history for k, v in entry.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)]


@contextmanager
def flow_run_tracking(cfg: PipelineConfig, flow: str) -> Iterator[Tracker | None]:
    """The flow run's MLflow run (None when MLflow is not in train.report_to), ended FINISHED or FAILED."""
    if not enabled(cfg):
        yield None
        return
    from prefect.exceptions import Pause

    tracker = Tracker.start(cfg, flow)
    token = _CURRENT.set(tracker)
    try:
        yield tracker
    except Pause:  # suspended for approval: the resumed flow run goes on in this MLflow run
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    else:
        tracker.end("FINISHED")
    finally:
        _CURRENT.reset(token)


def current() -> Tracker | None:
    return _CURRENT.get()


def handoff() -> dict[str, str] | None:
    """What the training child needs to log its curves into this flow run's MLflow run."""
    tracker = current()
    return {"uri": tracker.uri, "run_id": tracker.run_id} if tracker else None


# -- the champion in the MLflow Model Registry (promotion.registry: mlflow) --------------------------------

def model_name(cfg: PipelineConfig) -> str:
    return cfg.promotion.mlflow_model_name or f"loraflow-{cfg.run.name}"


def register_champion(cfg: PipelineConfig, tracker: Tracker, candidate) -> str:
    """Register the adapter logged to this run as a new version of the model and point the `champion` alias at it."""
    c, name = tracker.client, model_name(cfg)
    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(name, description="LoRA adapters promoted by loraflow-retrain (alias: champion)")
    source = f"{c.get_run(tracker.run_id).info.artifact_uri}/adapter"
    version = c.create_model_version(name, source, run_id=tracker.run_id, description=candidate.reason[:5000], tags={
        "loraflow.candidate_id": candidate.id, "loraflow.train_key": candidate.train_fingerprint,
        "loraflow.adapter": candidate.adapter})
    c.set_registered_model_alias(name, "champion", version.version)
    return version.version


def champion_id(cfg: PipelineConfig) -> str | None:
    """The registry candidate id the `champion` alias points at (None: no champion registered yet)."""
    from mlflow.exceptions import MlflowException

    c, name = client(tracking_uri(cfg)), model_name(cfg)
    try:
        version = c.get_model_version_by_alias(name, "champion")
    except MlflowException:  # no such model, or no such alias yet
        return None
    return version.tags.get("loraflow.candidate_id")


def champion_now(cfg: PipelineConfig):
    """Where a promotion checks who the champion is right now (`Registry.record`'s compare-and-set): None for the
    registry's own pointer, or with promotion.registry=mlflow a reader of the `champion` alias."""
    if cfg.promotion.registry != "mlflow":
        return None
    return lambda _state: champion_id(cfg)
