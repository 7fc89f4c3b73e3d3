"""Failures seen from Prefect: a run that failed in train and is retried resumes training with the
earlier stages cached; cancelling a deployed run stops the training child after it checkpoints.

Both run the real thing in separate processes against the test server: the `loraflow` CLI, the
`prefect flow-run retry|cancel` commands, and a `process` work pool worker.

Slow tier (a worker, deployments, a training child killed on purpose). Everyday coverage of the same paths on
the tiny model: cached earlier stages and a rerun of only what changed in
test_flow_e2e.py::test_reruns_recompute_only_what_changed; a training child that ends with its run in
test_flow_e2e.py::test_a_run_that_fails_before_training_ends_its_early_training_process; resuming from a
checkpoint in test_choices.py::test_raising_the_length_continues_the_shorter_run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import yaml

from loraflow.stages.train.stage import last_checkpoint
from test_flow_e2e import tiny_config
from tests_support import write_examples

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}


def _config(tmp_path: Path, tiny_llama_dir: Path, max_steps: int) -> dict:
    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir,
                      max_steps=max_steps, save_steps=5, save_total_limit=2, logging_steps=5)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"result_storage": str(tmp_path / "results")})})
    return cfg.model_dump(mode="json")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _training_child(root_pid: int) -> int | None:
    for pid in _descendants(root_pid):
        try:
            if b"loraflow.stages.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


def _wait_for_checkpoint(runs: Path, proc: subprocess.Popen, step: int = 5, timeout: float = 400) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(runs.glob(f"train/*.work/checkpoints/checkpoint-{step}/trainer_state.json"))
        if found:
            return found[0].parents[1]
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("no training checkpoint appeared")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _flow_runs(output_dir: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        runs = await client.read_flow_runs()
        return [r for r in runs if r.parameters.get("cfg", {}).get("run", {}).get("output_dir") == output_dir]


async def _latest_task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    latest: dict[str, tuple] = {}
    for r in runs:
        name = r.name.rsplit("-", 1)[0]
        if name not in latest or r.created > latest[name][0]:
            latest[name] = (r.created, r.state.name)
    return {name: state for name, (_, state) in latest.items()}


def _deploy_with_worker(tmp_path: Path, cfg: dict, env: dict[str, str], name: str) -> subprocess.Popen:
    """Deploy the finetune flow as `name` on a new `process` work pool, and start a worker for it (in its
    own session, so the test can kill it and the flow-run processes it started)."""
    from prefect import flow

    pool = f"loraflow-{name}"
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    remote = flow.from_source(source=str(REPO), entrypoint="flows/finetune.py:finetune")
    remote.deploy(name=name, work_pool_name=pool, parameters={"cfg": cfg}, print_next_steps=False)
    log = open(tmp_path / "worker.log", "w")
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_run_failed_in_train_and_retried_resumes_with_earlier_stages_cached(tmp_path, tiny_llama_dir, prefect_harness):
    cfg = _config(tmp_path, tiny_llama_dir, max_steps=40)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path)
    cli = [sys.executable, "-c", "import sys; from loraflow.cli.main import main; sys.exit(main())"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([*cli, "run", str(tmp_path / "cfg.yaml")], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        checkpoints = _wait_for_checkpoint(tmp_path / "runs", proc)
        child = _training_child(proc.pid)
        assert child is not None, "the train stage should run in a child process"
        os.kill(child, signal.SIGKILL)  # e.g. the kernel's OOM killer: the task fails, the flow process lives on
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()
    first_log = (tmp_path / "first.log").read_text()
    assert "error: train: the training process (exit code -9) was killed" in first_log, first_log[-3000:]
    killed_at = int(Path(last_checkpoint(checkpoints)).name.split("-")[-1])
    assert 5 <= killed_at < 40

    [failed] = anyio.run(_flow_runs, cfg["run"]["output_dir"])
    assert failed.state.name == "Failed"
    assert anyio.run(_latest_task_states, failed.id) == {
        "preflight": "Completed", "data": "Completed", "tokenize": "Completed", "model": "Completed", "train": "Failed"}

    retry = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", str(failed.id),
                            "--entrypoint", "flows/finetune.py:finetune"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    [retried] = anyio.run(_flow_runs, cfg["run"]["output_dir"])
    assert retried.id == failed.id and retried.state.name == "Completed"
    assert anyio.run(_latest_task_states, retried.id) == {
        "preflight": "Cached", "data": "Cached", "tokenize": "Cached", "model": "Cached", "train": "Completed",
        "evaluate": "Completed"}
    [train_dir] = [p for p in (tmp_path / "runs" / "train").iterdir() if (p / "manifest.json").is_file()]
    metrics = json.loads((train_dir / "train_metrics.json").read_text())
    assert metrics["resumed_from"].endswith(f"checkpoint-{killed_at}") and metrics["global_step"] == 40


def test_cancelling_a_deployed_run_stops_the_training_child(tmp_path, tiny_llama_dir, prefect_harness):
    from prefect.deployments import run_deployment

    cfg = _config(tmp_path, tiny_llama_dir, max_steps=100_000)  # runs until cancelled
    env = _env(tmp_path)
    worker = _deploy_with_worker(tmp_path, cfg, env, "cancel-test")
    try:
        run = run_deployment("loraflow-finetune/cancel-test", timeout=0)
        _wait_for_checkpoint(tmp_path / "runs", worker)
        child = _training_child(worker.pid)
        assert child is not None, "the train stage should run in a child of the flow-run process"
        cancel = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "cancel", str(run.id)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        deadline = time.time() + 180
        while _alive(child) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the training process outlived its cancelled flow run"
        state = None
        while time.time() < deadline:
            [state] = [r.state for r in anyio.run(_flow_runs, cfg["run"]["output_dir"])]
            if state.is_final():
                break
            time.sleep(1)
        assert state is not None and state.name == "Cancelled", state
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    # SIGTERM reached the child: it saved the step it was on, and published nothing half-trained.
    checkpoints = next((tmp_path / "runs" / "train").glob("*.work/checkpoints"))
    assert int(Path(last_checkpoint(checkpoints)).name.split("-")[-1]) > 5
    assert not list((tmp_path / "runs" / "train").glob("*/manifest.json"))


def test_a_deployed_run_failed_in_train_retried_from_the_cli_recomputes_only_what_failed(
        tmp_path, tiny_llama_dir, prefect_harness):
    """`prefect flow-run retry <id>` of a deployment run: the server reschedules it, a worker runs it again,
    and only the failed stage (and what follows) computes; training resumes from its checkpoint."""
    from prefect.deployments import run_deployment

    cfg = _config(tmp_path, tiny_llama_dir, max_steps=40)
    env = _env(tmp_path)
    worker = _deploy_with_worker(tmp_path, cfg, env, "retry-test")

    def final_state(deadline: float):
        while time.time() < deadline:
            [run] = anyio.run(_flow_runs, cfg["run"]["output_dir"])
            if run.state.is_final():
                return run
            time.sleep(0.5)
        raise AssertionError(f"the run did not finish: {(tmp_path / 'worker.log').read_text()[-3000:]}")

    try:
        run = run_deployment("loraflow-finetune/retry-test", timeout=0)
        checkpoints = _wait_for_checkpoint(tmp_path / "runs", worker)
        child = _training_child(worker.pid)
        assert child is not None
        os.kill(child, signal.SIGKILL)  # the training process dies (OOM killer): the train task fails
        failed = final_state(time.time() + 180)
        assert failed.state.name == "Failed", failed.state
        killed_at = int(Path(last_checkpoint(checkpoints)).name.split("-")[-1])
        assert 5 <= killed_at < 40
        retry = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", str(run.id)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
        retried = final_state(time.time() + 400)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert retried.id == run.id and retried.state.name == "Completed", retried.state
    assert anyio.run(_latest_task_states, retried.id) == {
        "preflight": "Cached", "data": "Cached", "tokenize": "Cached", "model": "Cached", "train": "Completed",
        "evaluate": "Completed"}
    [train_dir] = [p for p in (tmp_path / "runs" / "train").iterdir() if (p / "manifest.json").is_file()]
    metrics = json.loads((train_dir / "train_metrics.json").read_text())
    assert metrics["resumed_from"].endswith(f"checkpoint-{killed_at}") and metrics["global_step"] == 40
