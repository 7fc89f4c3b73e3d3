"""Ctrl-C and kill -9 of `loraflow run` on its own temporary Prefect server (no PREFECT_API_URL), as a terminal and
the OOM killer do them: nothing hangs, the run is recorded as ended, the next run resumes, and a `gpu` slot or a
temporary server a killed run left behind is released by the next run.

The CLI tests are slow tier (training children interrupted and killed on purpose, real servers). Their paths in the
everyday tier: the worker takes SIGINT as a request to save and stop (test_the_worker_takes_ctrl_c_as_save_and_stop),
an orphaned temporary server is stopped (test_a_temporary_server_whose_run_was_killed_is_stopped), the `gpu` slot of a
gone holder is released and a live one's kept (test_a_slot_holder_that_is_gone_is_named_for_release_and_a_live_one_is_kept),
training resumes from its checkpoint (test_choices.py::test_raising_the_length_continues_the_shorter_run).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_retry_cancel import REPO, _alive, _wait_for_checkpoint
from test_retry_cancel import _config as _base_config
from tests_support import gated, gated_evaluation

STEPS, HOLD = 12, 5
CLI = [sys.executable, "-c", "import sys; from loraflow.cli.main import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One Prefect home for the module (its database migrated once), used by temporary servers only."""
    return tmp_path_factory.mktemp("prefect-home")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO"}


def _start(tmp_path: Path, home: Path, name: str, hold: bool = False, hold_evaluation: bool = False) -> subprocess.Popen:
    """`loraflow run` in a process group of its own, as a shell starts a foreground job; `hold`: its training holds
    after checkpoint-HOLD, `hold_evaluation`: its evaluation holds at the first generation (`tests_support`)."""
    env = gated(_env(home), tmp_path, HOLD) if hold else _env(home)
    env = gated_evaluation(env, tmp_path) if hold_evaluation else env
    return subprocess.Popen([*CLI, "run", str(tmp_path / "cfg.yaml")], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def _write_config(tmp_path: Path, tiny_llama_dir: Path, **eval_) -> None:
    cfg = _base_config(tmp_path, tiny_llama_dir, max_steps=STEPS)
    cfg["eval"] = {**cfg["eval"], **eval_}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))


def _flow_run_states(home: Path) -> list[str]:
    with sqlite3.connect(home / "prefect.db") as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run ORDER BY created")]


def _servers(home: Path) -> list[int]:
    """pids of the temporary servers this home's records name that still run."""
    return [json.loads(p.read_text())["pid"] for p in (home / "loraflow-servers").glob("*.json")
            if _alive(json.loads(p.read_text())["pid"])]


def _interrupt(proc: subprocess.Popen) -> float:
    """Ctrl-C as a terminal sends it (SIGINT to the whole foreground process group); seconds until the run exits."""
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)  # before: the flow retried against its dead server for minutes
    return time.monotonic() - started


def _rerun(tmp_path: Path, home: Path) -> str:
    proc = _start(tmp_path, home, "rerun")
    assert proc.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    return (tmp_path / "rerun.log").read_text()


@pytest.mark.slow
def test_ctrl_c_during_training_exits_records_the_run_and_the_rerun_resumes(tmp_path, tiny_llama_dir, home):
    _write_config(tmp_path, tiny_llama_dir)
    proc = _start(tmp_path, home, "first", hold=True)
    try:
        _wait_for_checkpoint(tmp_path / "runs", proc, step=HOLD)
        seconds = _interrupt(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    print(f"Ctrl-C during training: exited in {seconds:.1f} s")
    assert proc.returncode == 130 and "interrupted: the run is recorded as crashed" in log, log[-3000:]
    work = next((tmp_path / "runs" / "train").glob("*.work"))
    assert (work / "checkpoints" / f"checkpoint-{HOLD + 1}").is_dir()  # Ctrl-C reached the child: it saved its step
    assert _flow_run_states(home)[-1] in ("CRASHED", "CANCELLED")  # recorded while its server was up
    assert not _servers(home)  # and the server was stopped last

    log = _rerun(tmp_path, home)
    train = json.loads(next((tmp_path / "runs" / "train").glob("*/train_metrics.json")).read_text())
    assert train["global_step"] == STEPS and train["resumed_from"].endswith(f"checkpoint-{HOLD + 1}"), train


@pytest.mark.slow
def test_ctrl_c_during_evaluation_exits_and_publishes_nothing(tmp_path, tiny_llama_dir, home):
    _write_config(tmp_path, tiny_llama_dir)
    proc = _start(tmp_path, home, "first", hold_evaluation=True)
    try:
        deadline = time.time() + 400
        while not (tmp_path / "eval-gate.reached").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        seconds = _interrupt(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"Ctrl-C during evaluation: exited in {seconds:.1f} s")
    assert proc.returncode == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert not list((tmp_path / "runs" / "evaluate").glob("*/metrics.json"))
    assert _flow_run_states(home)[-1] in ("CRASHED", "CANCELLED") and not _servers(home)
    log = _rerun(tmp_path, home)
    assert "train: hit" in log, log[-3000:]


@pytest.mark.slow
def test_a_gpu_slot_and_a_server_left_by_a_killed_run_are_released_by_the_next(tmp_path, tiny_llama_dir, home):
    """The sequence of a user on one machine: `loraflow up` once made the `gpu` limit of 1 slot; a `loraflow run` is
    killed (SIGKILL, as the OOM killer does) in training while a second run of the config waits for the slot; the
    waiting run says what it waits for, and goes on once the holder is gone. (Before: it waited until stopped by
    hand, 17 minutes in the report.)"""
    env = _env(home)
    made = subprocess.run([sys.executable, "-m", "prefect", "concurrency-limit", "create", "gpu", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    _write_config(tmp_path, tiny_llama_dir)
    proc = _start(tmp_path, home, "first", hold=True)
    waiter = None
    try:
        _wait_for_checkpoint(tmp_path / "runs", proc, step=HOLD)
        [server] = _servers(home)
        waiter = _start(tmp_path, home, "waiter")
        deadline = time.time() + 300
        while "train: waiting for a `gpu` slot (1 of 1 taken, by task_run" not in (tmp_path / "waiter.log").read_text():
            assert waiter.poll() is None and time.time() < deadline, (tmp_path / "waiter.log").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # the flow process alone: its server is orphaned, its slot still taken
        proc.wait(timeout=60)
        assert waiter.wait(timeout=600) == 0, (tmp_path / "waiter.log").read_text()[-3000:]
    finally:
        for p in (proc, waiter):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    log = (tmp_path / "waiter.log").read_text()
    assert "released the `gpu` slot held by task run train" in log and "gone)" in log, log[-3000:]
    train = json.loads(next((tmp_path / "runs" / "train").glob("*/train_metrics.json")).read_text())
    assert train["global_step"] == STEPS and "checkpoint-" in (train["resumed_from"] or ""), train
    assert _alive(server)
    _rerun(tmp_path, home)  # every stage cached; its temporary server start stops the orphan
    assert not _alive(server)


def test_the_worker_takes_ctrl_c_as_save_and_stop():
    """A Ctrl-C reaches the training child too: the first SIGINT asks it to checkpoint at the step's end, a second
    one stops it at once."""
    code = ("import os, signal\nfrom loraflow.stages.worker import Preemption\nPreemption.install()\n"
            "os.kill(os.getpid(), signal.SIGINT)\nassert Preemption.requested\n"
            "try:\n    os.kill(os.getpid(), signal.SIGINT)\nexcept KeyboardInterrupt:\n    print('stopped')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr
    assert "SIGINT received, saving a checkpoint after this step" in done.stderr


def test_a_temporary_server_whose_run_was_killed_is_stopped(tmp_path, monkeypatch):
    """A run killed with SIGKILL leaves its temporary server running (its own session); the next run stops it,
    and leaves servers whose run is alive, and processes that are not our servers, alone."""
    from loraflow.ops import tempserver
    from loraflow.procs import identity

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    orphan = subprocess.Popen([*sleeper, tempserver._APP], start_new_session=True)  # its cmdline names the app
    owned = subprocess.Popen([*sleeper, tempserver._APP], start_new_session=True)
    stranger = subprocess.Popen(sleeper, start_new_session=True)
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    records = tmp_path / "loraflow-servers"
    records.mkdir()
    me = identity()
    dead = {**me, "pid": dead_owner.pid, "pid_start": "gone"}
    for server, owner in ((orphan, dead), (owned, me), (stranger, dead)):
        (records / f"{server.pid}.json").write_text(json.dumps({"pid": server.pid, "owner": owner, "port": 1}))
    try:
        from prefect.settings import PREFECT_HOME, temporary_settings

        with temporary_settings({PREFECT_HOME: tmp_path}):
            assert tempserver.stop_orphans() == [orphan.pid]
        assert orphan.wait(timeout=30) is not None
        assert owned.poll() is None and stranger.poll() is None
        assert sorted(p.name for p in records.iterdir()) == [f"{owned.pid}.json"]
    finally:
        for proc in (orphan, owned, stranger):
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_loraflow_up_stops_everything_it_started_on_sigterm(tmp_path, home):
    """`kill`, systemd and `docker stop` send SIGTERM: server, worker and watcher stop as on Ctrl-C. (Before:
    `loraflow up` ended and left them running in their own sessions.)"""
    from test_retry_cancel import _descendants
    from tests_support import free_port

    up = subprocess.Popen([*CLI, "up", "--port", str(free_port())], cwd=REPO, env=_env(home), text=True,
                          stdout=subprocess.PIPE, stderr=open(tmp_path / "up.err", "w"))
    try:
        deadline = time.time() + 600
        for line in up.stdout:
            if line.startswith("Prefect UI:"):
                break
            assert time.time() < deadline
        started = _descendants(up.pid)
        assert len(started) >= 3, (tmp_path / "up.err").read_text()[-3000:]
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0
        deadline = time.time() + 60
        while any(_alive(pid) for pid in started):
            assert time.time() < deadline, "server, worker or watcher outlived `loraflow up`"
            time.sleep(0.2)
    finally:
        for pid in _descendants(up.pid):
            os.kill(pid, signal.SIGKILL)
        up.kill()


def test_a_slot_holder_that_is_gone_is_named_for_release_and_a_live_one_is_kept(tmp_path):
    """What `wait_for_slots` releases: the `gpu` slot of a task run whose recorded process is gone, never one whose
    process runs (the slow test_a_gpu_slot_and_a_server_left_by_a_killed_run_are_released_by_the_next is the whole
    sequence on a real server)."""
    import uuid

    from prefect.settings import PREFECT_HOME, temporary_settings

    from loraflow.procs import boot_id, identity, pid_start
    from tasks.slots import _dead_holder, _holders_dir

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = pid_start(child.pid)
    child.kill()
    child.wait()
    with temporary_settings({PREFECT_HOME: str(tmp_path)}):
        folder = _holders_dir()
        folder.mkdir(parents=True)
        dead, live = uuid.uuid4(), uuid.uuid4()
        (folder / f"{dead}.json").write_text(json.dumps({**identity(), "pid": child.pid, "pid_start": started,
                                                         "boot_id": boot_id(), "task_run": "train-1"}))
        (folder / f"{live}.json").write_text(json.dumps({**identity(), "task_run": "train-2"}))
        assert _dead_holder(dead) == f"task run train-1 (pid {child.pid}, gone)"
        assert _dead_holder(live) is None and _dead_holder(uuid.uuid4()) is None


def test_a_ctrl_c_that_python_drops_is_raised_again():
    """A KeyboardInterrupt raised inside a finalizer or weakref callback is printed as "ignored" and lost (seen once
    in test_ctrl_c_during_evaluation_exits_and_publishes_nothing: the run went on and completed). Inside
    `ctrl_c_stops` the interrupt comes again until the run ends."""
    code = ("import os, signal, time\nfrom loraflow.cli.main import ctrl_c_stops\nswallowed = 0\n"
            "try:\n    with ctrl_c_stops():\n        sent = False\n"
            "        deadline = time.monotonic() + 60\n"
            "        while time.monotonic() < deadline:\n"
            "            try:\n                if not sent:\n                    sent = True\n"
            "                    os.kill(os.getpid(), signal.SIGINT)\n                time.sleep(0.05)\n"
            "            except KeyboardInterrupt:\n"
            "                if swallowed == 0:\n                    swallowed += 1\n                    continue\n"
            "                raise\n"
            "except KeyboardInterrupt:\n    print('stopped after', swallowed)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "stopped after 1", done.stdout + done.stderr
