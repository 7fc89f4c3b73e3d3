"""A killed flow process (OOM, pod eviction, kill -9) never blocks the next run of its config.

The flow process holds the stage's lock while the stage runs. SIGKILL it during train, and
separately during evaluate: the next `loraflow run` of the same config breaks the dead run's lock
(its pid is gone), resumes training from the checkpoint, completes, and reuses nothing half-written.

Slow tier (the flow and its training child are killed on purpose). Everyday coverage: a lock held by a killed
process is broken in test_locks.py::test_a_lock_left_by_a_dead_process_on_this_machine_is_broken, a stage that
fails halfway publishes nothing in test_artifacts.py::test_a_stage_that_fails_halfway_leaves_nothing, and
training resumes from its checkpoint in test_choices.py::test_raising_the_length_continues_the_shorter_run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_retry_cancel import REPO, _alive, _config, _descendants, _env, _wait_for_checkpoint
from tests_support import gated as gated_env

pytestmark = pytest.mark.slow
STEPS, HOLD = 12, 5  # the gated run holds before step HOLD + 1 (checkpoint-HOLD written) until it is killed
CLI = [sys.executable, "-c", "import sys; from loraflow.cli.main import main; sys.exit(main())"]

def _start(tmp_path: Path, name: str, gated: bool = False) -> subprocess.Popen:
    """`loraflow run` of the test's config; `gated`: its training holds after checkpoint-HOLD (`tests_support.gated`)."""
    log = open(tmp_path / f"{name}.log", "w")
    env = _env(tmp_path)
    if gated:
        env = gated_env(env, tmp_path, HOLD)
    return subprocess.Popen([*CLI, "run", str(tmp_path / "cfg.yaml")], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _kill_flow(proc: subprocess.Popen) -> None:
    """SIGKILL the flow process alone (its training child gets SIGTERM from the kernel and checkpoints)."""
    children = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 180
    while any(_alive(pid) for pid in children):
        assert time.time() < deadline, "the flow's children outlived it"
        time.sleep(0.2)


def _locks(tmp_path: Path, stage: str) -> list[Path]:
    return list((tmp_path / "runs" / ".locks").glob(f"loraflow-{stage}-*.lock"))


def _rerun(tmp_path: Path) -> str:
    proc = _start(tmp_path, "rerun")
    assert proc.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    return (tmp_path / "rerun.log").read_text()


def test_flow_killed_in_train_leaves_no_lock_that_blocks_the_rerun(tmp_path, tiny_llama_dir, prefect_harness):
    cfg = _config(tmp_path, tiny_llama_dir, max_steps=STEPS)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = _start(tmp_path, "first", gated=True)
    try:
        _wait_for_checkpoint(tmp_path / "runs", proc, step=HOLD)
        assert _locks(tmp_path, "train"), "the running train stage holds its lock"
        # A second run of the config waits for the live first one, and a SIGTERM ends that wait promptly.
        waiter = _start(tmp_path, "waiter")
        deadline = time.time() + 300
        while "model: hit" not in (tmp_path / "waiter.log").read_text():
            assert waiter.poll() is None and time.time() < deadline, (tmp_path / "waiter.log").read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(2)  # now waiting on the train lock
        assert waiter.poll() is None
        waiter.send_signal(signal.SIGTERM)
        started = time.time()
        waiter.wait(timeout=60)
        assert time.time() - started < 15, "the waiting run ignored SIGTERM"
        assert not list((tmp_path / "runs" / "train").glob("*/manifest.json")), "training ended before the kill"
        _kill_flow(proc)
    finally:
        proc.kill()
    [dead] = _locks(tmp_path, "train")  # left behind by the killed process
    assert json.loads(dead.read_text())["pid"] == proc.pid

    log = _rerun(tmp_path)
    assert "broken, its holder (pid" in log, log[-3000:]
    train = json.loads(next((tmp_path / "runs" / "train").glob("*/train_metrics.json")).read_text())
    assert train["global_step"] == STEPS and "checkpoint-" in (train["resumed_from"] or ""), train
    assert not _locks(tmp_path, "train") and not list((tmp_path / "runs" / "train").glob("*.work"))


def test_flow_killed_in_evaluate_leaves_no_lock_and_no_half_written_result(tmp_path, tiny_llama_dir, prefect_harness):
    cfg = _config(tmp_path, tiny_llama_dir, max_steps=10)
    cfg["eval"] = {**cfg["eval"], "max_new_tokens": 32}  # long enough to be caught mid-generation
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = _start(tmp_path, "first")
    try:
        deadline = time.time() + 400
        while not _locks(tmp_path, "evaluate"):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        _kill_flow(proc)
    finally:
        proc.kill()
    evaluate = tmp_path / "runs" / "evaluate"
    assert not list(evaluate.glob("*/metrics.json")), "the killed evaluate stage published nothing"

    log = _rerun(tmp_path)
    assert "broken, its holder (pid" in log and "train: hit" in log, log[-3000:]
    [done] = list(evaluate.glob("*/manifest.json"))
    metrics = json.loads((done.parent / "metrics.json").read_text())
    assert metrics["n_examples"] == len((done.parent / "predictions.jsonl").read_text().splitlines())
    assert not _locks(tmp_path, "evaluate")
