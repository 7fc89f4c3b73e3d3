"""Experiment tracking against a real MLflow tracking server (sqlite backend store, local artifact root), started
by the test on 127.0.0.1 from its own tool environment (`uvx --from mlflow==...`: the full `mlflow` cannot be
installed beside the project's pins; the project has the client, `mlflow-skinny`). Everything is read back
through `mlflow.MlflowClient`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from loraflow.ops.tracking import MLFLOW_SERVER
from test_flow_e2e import _task_states, tiny_config
from tests_support import free_port, write_examples


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        ["uvx", "--from", MLFLOW_SERVER, "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # the first start installs the server's environment
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    try:
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def tracked(cfg, uri: str, **promotion):
    data = cfg.model_dump(mode="json")
    data["train"]["report_to"] = ["tensorboard", "mlflow"]
    data["run"]["mlflow_tracking_uri"] = uri
    data["promotion"].update(promotion)
    from loraflow.config import build_config

    return build_config(data)


@pytest.mark.slow
def test_a_flow_run_is_one_mlflow_run_with_config_curves_scores_and_adapter(tmp_path, tiny_llama_dir, prefect_harness,
                                                                            mlflow_uri):
    """Slow tier: an MLflow server. Everyday: the same flow untracked in
    test_flow_e2e.py::test_flow_trains_and_scores_tiny_model, the tracking settings and the params in
    test_mlflow_settings_that_cannot_work_fail_in_one_line and test_the_config_is_logged_as_dotted_text_params."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.finetune import finetune

    cfg = tracked(tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=8,
                              save_steps=8, logging_steps=2), mlflow_uri)
    state = finetune(cfg, return_state=True)
    result = state.result()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cached"] == "false"
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert run.data.params["model.name_or_path"] == str(tiny_llama_dir)
    # the curves come from the training child, live: one loss point per step the Trainer logged a loss at
    history = json.loads((Path(result["stages_paths"]["train"]) / "trainer_state.json").read_text())["log_history"]
    logged = [(e["step"], e["loss"]) for e in history if "loss" in e]
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [s for s, _ in logged] and len(logged) >= 4
    assert [m.value for m in loss] == pytest.approx([v for _, v in logged])
    assert client.get_metric_history(run.info.run_id, "learning_rate")
    m = run.data.metrics
    rouge = result["metrics"]["finetuned"]["rougeL_fmeasure"]
    assert m["test_finetuned_rougeL"] == pytest.approx(rouge)
    assert m["test_finetuned_rougeL_ci_low"] <= rouge <= m["test_finetuned_rougeL_ci_high"]
    assert m["test_n"] == result["metrics"]["n_examples"] and "validation_finetuned_rougeL" in m
    assert "test_vs_base_rougeL_ci_low" in m
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts

    # The Prefect run links back to its MLflow run.
    import anyio

    async def links():
        async with get_client() as c:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            return await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    (link,) = [a for a in anyio.run(links) if a.key and a.key.endswith("-mlflow")]
    assert run.info.run_id in link.data

    # The same config again: every stage cached; a new MLflow run says so and still has the curves and scores.
    again = finetune(cfg, return_state=True)
    assert all(names == {"Cached"} for names in _task_states(again).values())
    rerun = client.get_run(again.result()["mlflow_run_id"])
    assert rerun.info.run_id != run.info.run_id and rerun.data.tags["cached"] == "true"
    replayed = client.get_metric_history(rerun.info.run_id, "loss")
    assert [p.step for p in replayed] == [s for s, _ in logged]
    assert [p.value for p in replayed] == pytest.approx([v for _, v in logged])
    assert rerun.data.metrics["test_finetuned_rougeL"] == pytest.approx(rouge)


@pytest.mark.slow
def test_a_promoted_champion_is_registered_in_mlflow_and_read_back_from_there(tmp_path, tiny_llama_dir,
                                                                             prefect_harness, mlflow_uri):
    """Slow tier: an MLflow server. Everyday: promotion with the file registry in
    test_retrain.py::test_retraining_promotes_only_what_beats_the_champion."""
    from mlflow import MlflowClient

    from flows.retrain import retrain

    cfg = tracked(tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=4,
                              save_steps=4), mlflow_uri, registry="mlflow", mlflow_model_name="tiny-champion")
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"enabled": False})})
    first = retrain(cfg)
    assert first["promoted"]
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("tiny-champion", "champion")
    assert version.tags["loraflow.candidate_id"] == first["champion"]["id"] and version.run_id == first["mlflow_run_id"]
    assert version.source.endswith("/adapter")
    files = {f.path for f in client.list_artifacts(version.run_id, "adapter")}
    assert "adapter/adapter_config.json" in files

    # Retraining reads the champion from MLflow: with the JSON file's pointer gone, the same data is still "unchanged".
    registry = Path(cfg.run.output_dir) / "registry" / "registry.json"
    data = json.loads(registry.read_text())
    data["champion"] = None
    registry.write_text(json.dumps(data))
    # ... and the champion's export follows the alias too (export.enabled auto exports the champion's adapter)
    exporting = cfg.model_copy(update={"export": cfg.export.model_copy(update={"enabled": "auto", "format": "merged"})})
    second = retrain(exporting)
    assert second["decision"].startswith("unchanged") and second["champion"]["id"] == first["champion"]["id"]
    assert len(client.search_model_versions("name = 'tiny-champion'")) == 1
    assert second["export"] is not None and Path(second["export"]["files"]["merged"]).is_dir()
    assert any(f.path == "export/merged" for f in client.list_artifacts(second["mlflow_run_id"], "export"))


def test_mlflow_settings_that_cannot_work_fail_in_one_line(monkeypatch):
    from loraflow.config import ConfigError, build_config
    from loraflow.ops.tracking import TrackingError, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config({"train": {"report_to": ["mlflow"]}})
    with pytest.raises(TrackingError, match=r"no tracking server is set: set run.mlflow_tracking_uri"):
        tracking_uri(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(cfg) == "http://127.0.0.1:5999"
    with pytest.raises(ConfigError, match=r"promotion.registry=mlflow .* add mlflow to train.report_to"):
        build_config({"promotion": {"registry": "mlflow"}})


def test_the_config_is_logged_as_dotted_text_params():
    from loraflow.config import build_config
    from loraflow.ops.tracking import params

    cfg = build_config({"train": {"learning_rate": 3e-4, "report_to": ["mlflow"]}, "lora": {"target_modules": ["q_proj"]}})
    logged = params(cfg)
    assert logged["train.learning_rate"] == "0.0003"
    assert logged["lora.target_modules"] == '["q_proj"]'  # lists as JSON text
    assert all(isinstance(v, str) for v in logged.values())
    assert set(logged) >= {"model.name_or_path", "data.source", "quantization.mode"}
