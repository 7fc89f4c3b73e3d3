"""Result storage and artifacts on S3: a real S3-compatible server (moto's, from its package) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow.store.artifacts import atomic_dir, verify
from loraflow.store.remote import check_writable, download, local_root, upload
from test_flow_e2e import _task_states, tiny_config
from tests_support import free_port, write_examples

BUCKET = "loraflow-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint in its own process, reached through the standard AWS settings, with one bucket."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stage_folder(root: Path) -> Path:
    with atomic_dir(root / "train" / "abc123") as tmp:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        (tmp / "train_metrics.json").write_text('{"global_step": 3}')
    return root / "train" / "abc123"


def test_stage_folders_go_up_and_come_back_checked(s3, tmp_path):
    folder = _stage_folder(tmp_path / "a")
    url = f"s3://{BUCKET}/unit/train/abc123"
    upload(folder, url)
    assert s3.exists(f"{BUCKET}/unit/train/abc123/manifest.json")
    copy = tmp_path / "b" / "train" / "abc123"
    assert download(url, copy) is None and verify(copy) is None
    assert (copy / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (folder / "adapter" / "adapter_model.safetensors").read_bytes()

    # An upload cut off before its manifest is not a stage folder; a damaged object fails its checksum.
    s3.rm(f"{BUCKET}/unit/train/abc123/manifest.json")
    assert "has no manifest.json" in download(url, tmp_path / "c")
    upload(folder, url)
    s3.pipe_file(f"{BUCKET}/unit/train/abc123/train_metrics.json", b'{"global_step": 4}')
    assert "does not match its checksum" in download(url, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_download_writes_only_listed_files_and_only_inside_the_folder(s3, tmp_path):
    """Object keys are any text: an uploaded stage with a key such as `adapter/../../../x`, or a manifest listing
    `../x`, must not write outside this machine's mirror. (Before: every key under the folder was joined to the
    local path, unchecked, before the checksums were looked at.)"""
    import json

    folder = _stage_folder(tmp_path / "a")
    url = f"s3://{BUCKET}/evil/train/abc123"
    upload(folder, url)
    mirror = tmp_path / "mirror" / "train" / "abc123"
    s3.pipe_file(f"{BUCKET}/evil/train/abc123/adapter/../../../../escaped.txt", b"owned")  # a stored key, not listed
    assert download(url, mirror) is None and verify(mirror) is None
    assert not list(tmp_path.rglob("escaped.txt"))

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../escaped.txt"] = {"size": 5, "sha256": "0" * 64}
    s3.pipe_file(f"{BUCKET}/evil/train/abc123/manifest.json", json.dumps(manifest).encode())
    problem = download(url, tmp_path / "other" / "train" / "abc123")
    assert "lists '../../escaped.txt', a path outside the stage folder: refused" in problem
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "other" / "train" / "abc123").exists()


def test_unusable_locations_fail_in_one_line_that_names_the_fix(s3):
    with pytest.raises(PermissionError, match=r"^run.output_dir 's3://no-such-bucket/runs' is not writable .*"
                                              r"create the bucket or fix the credentials"):
        check_writable("s3://no-such-bucket/runs")
    with pytest.raises(ValueError, match=r"^run.output_dir 'nosuch://x/runs': no filesystem for nosuch://"):
        check_writable("nosuch://x/runs")


def test_a_second_worker_reuses_every_stage_through_s3(s3, tmp_path, tiny_llama_dir, prefect_harness):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.finetune import finetune

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=2, save_steps=2)
    run = {"output_dir": f"s3://{BUCKET}/runs", "result_storage": f"s3://{BUCKET}/results",
           "cache_dir": str(tmp_path / "worker-a")}
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update=run)})
    first = finetune(cfg, return_state=True)
    assert first.is_completed()
    result = first.result()
    for stage, fp in result["stages"].items():
        assert s3.exists(f"{BUCKET}/runs/{stage}/{fp}/manifest.json"), stage
    assert len(s3.ls(f"{BUCKET}/results")) >= 5  # Prefect's result records for the five stages
    assert result["adapter_url"] == f"s3://{BUCKET}/runs/train/{result['stages']['train']}/adapter"
    assert result["adapter"].startswith(str(tmp_path / "worker-a" / "mirror" / "s3"))

    # Another worker: its own cache folder (so its own mirror) and its own Prefect storage.
    other = cfg.model_copy(update={"run": cfg.run.model_copy(update={"cache_dir": str(tmp_path / "worker-b")})})
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "worker-b-prefect"}):
        again = finetune(other, return_state=True)
    assert again.is_completed()
    assert all(names == {"Cached"} for names in _task_states(again).values()), _task_states(again)
    mirror_b = local_root(other.run.output_dir, other.run.cache_dir)
    assert mirror_b == tmp_path / "worker-b" / "mirror" / "s3" / BUCKET / "runs"
    for stage, fp in again.result()["stages"].items():
        assert verify(mirror_b / stage / fp) is None, stage  # downloaded and checked before use
    assert again.result()["metrics"] == result["metrics"]


def test_retraining_to_a_url_needs_a_registry_folder(s3, tmp_path, tiny_llama_dir, prefect_harness):
    from flows.retrain import retrain

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": f"s3://{BUCKET}/retrain"})})
    with pytest.raises(ValueError, match=r"^promotion.registry_dir: run.output_dir is a URL .*; set "
                                         r"promotion.registry_dir to a folder every retraining run can see"):
        retrain(cfg)
    assert not s3.exists(f"{BUCKET}/retrain/data")  # refused before any stage ran


def test_a_champion_trained_on_another_worker_is_fetched_from_the_store_and_compared(s3, tmp_path, tiny_llama_dir,
                                                                                     prefect_harness):
    """Worker B retrains against a champion worker A trained (A's machine, and so its mirror, is not there): the
    champion's stages come from S3 into B's mirror and the challenger is compared with it. (Before: "compared with
    nothing", and promoted.)"""
    import shutil

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.retrain import retrain
    from loraflow.ops.registry import Registry

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=2, save_steps=2)
    run = {"output_dir": f"s3://{BUCKET}/retrain", "cache_dir": str(tmp_path / "worker-a")}
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update=run), "export": cfg.export.model_copy(update={"enabled": False}),
                                 "promotion": cfg.promotion.model_copy(update={"registry_dir": str(tmp_path / "registry")})})
    first = retrain(cfg)
    assert first["promoted"] and "no champion yet" in first["decision"]
    champion = Registry(tmp_path / "registry").champion()
    shutil.rmtree(tmp_path / "worker-a")  # worker A's machine is gone; its stages are in the shared store

    other = cfg.model_copy(update={"run": cfg.run.model_copy(update={"cache_dir": str(tmp_path / "worker-b")}),
                                   "train": cfg.train.model_copy(update={"learning_rate": 2e-3})})
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "worker-b-prefect"}):
        second = retrain(other)
    challenger = Registry(tmp_path / "registry").read().candidates[-1]
    assert challenger.champion_id == champion.id and challenger.champion_score is not None, second["decision"]
    assert "validation rougeL vs champion" in challenger.reason and challenger.validation["n"] > 0
    mirror_b = local_root(other.run.output_dir, other.run.cache_dir)
    assert verify(mirror_b / "train" / champion.train_fingerprint) is None  # fetched and checked before use
