"""Stage locks under contention: runs racing for one cache key never see a half-written lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from loraflow.store.locks import AtomicFileLockManager

REPO = Path(__file__).resolve().parents[1]


def _race(lock_dir, workers: int = 8, rounds: int = 30) -> tuple[list[str], int]:
    errors: list[str] = []
    inside, overlaps = [0], [0]

    def worker(i: int) -> None:
        manager = AtomicFileLockManager(lock_dir)  # one per run, as each flow run builds its own policy
        for _ in range(rounds):
            try:
                assert manager.acquire_lock("loraflow-train-abc", holder=f"run-{i}")
                inside[0] += 1
                overlaps[0] += inside[0] > 1
                time.sleep(0.001)
                inside[0] -= 1
                manager.release_lock("loraflow-train-abc", holder=f"run-{i}")
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(err))
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors, overlaps[0]


def test_racing_holders_take_turns_without_reading_a_half_written_lock(tmp_path):
    # Prefect's FileSystemLockManager fails this race with "EOF while parsing a value" (CI, stop 9).
    errors, overlaps = _race(tmp_path / "locks")
    assert errors == [] and overlaps == 0
    assert list((tmp_path / "locks").iterdir()) == []  # every lock released, no temporary files left


def test_lock_holder_timeout_and_release_rules(tmp_path):
    a, b = AtomicFileLockManager(tmp_path), AtomicFileLockManager(tmp_path)
    assert a.acquire_lock("k", "run-a") and a.acquire_lock("k", "run-a")  # re-entrant for its holder
    assert b.is_locked("k") and not b.is_lock_holder("k", "run-b") and a.is_lock_holder("k", "run-a")
    started = time.monotonic()
    assert b.acquire_lock("k", "run-b", acquire_timeout=0.3) is False
    assert time.monotonic() - started >= 0.3
    assert b.wait_for_lock("k", timeout=0.2) is False
    with pytest.raises(ValueError, match="No lock held by run-b"):
        b.release_lock("k", "run-b")
    a.release_lock("k", "run-a")
    assert b.wait_for_lock("k", timeout=0.2) and b.acquire_lock("k", "run-b", acquire_timeout=0.2)
    with pytest.raises(ValueError, match="No lock for transaction"):
        a.release_lock("other", "run-a")


def test_an_expired_lock_is_taken_over(tmp_path):
    a, b = AtomicFileLockManager(tmp_path), AtomicFileLockManager(tmp_path)
    assert a.acquire_lock("k", "crashed-run", hold_timeout=0.2)
    assert b.acquire_lock("k", "run-b", acquire_timeout=5)
    assert b.is_lock_holder("k", "run-b")


def _holder_info(lock_dir, key: str = "k") -> dict:
    import json

    return json.loads((lock_dir / f"{key}.lock").read_text())


def _rewrite(lock_dir, key: str = "k", **changes) -> None:
    import json

    path = lock_dir / f"{key}.lock"
    path.write_text(json.dumps({**_holder_info(lock_dir, key), **changes}))


def test_a_lock_left_by_a_dead_process_on_this_machine_is_broken(tmp_path):
    import subprocess
    import sys

    # A real process takes the lock and is killed with it held.
    code = ("import sys, time; sys.path[:0] = sys.argv[1:2]; from loraflow.store.locks import AtomicFileLockManager as M; "
            f"M({str(tmp_path)!r}).acquire_lock('k', 'dead-run'); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert _holder_info(tmp_path)["pid"] == proc.pid
    b = AtomicFileLockManager(tmp_path)
    assert b.acquire_lock("k", "run-b", acquire_timeout=0.3) is False  # alive: its lock stands
    proc.kill()
    proc.wait()
    started = time.monotonic()
    assert b.acquire_lock("k", "run-b", acquire_timeout=5) and b.is_lock_holder("k", "run-b")
    assert time.monotonic() - started < 2  # at once, not after a staleness timeout


def test_a_live_holder_keeps_its_lock_however_old_and_a_reused_pid_does_not(tmp_path):
    import os

    a, b = AtomicFileLockManager(tmp_path), AtomicFileLockManager(tmp_path, stale_seconds=0.1)
    assert a.acquire_lock("k", "long-training")
    os.utime(tmp_path / "k.lock", (0, 0))  # a heartbeat from 1970: on this machine the pid decides
    assert b.acquire_lock("k", "run-b", acquire_timeout=0.3) is False
    _rewrite(tmp_path, pid_start="1")  # the pid now belongs to another process: the holder is gone
    assert b.acquire_lock("k", "run-b", acquire_timeout=2)


def test_a_holder_on_another_machine_is_judged_by_its_heartbeat(tmp_path):
    import os

    a, b = AtomicFileLockManager(tmp_path), AtomicFileLockManager(tmp_path, stale_seconds=30)
    assert a.acquire_lock("k", "remote-run")
    _rewrite(tmp_path, host="gpu-node-7", pid=1)
    assert b.acquire_lock("k", "run-b", acquire_timeout=0.3) is False  # a fresh heartbeat: alive
    os.utime(tmp_path / "k.lock", (time.time() - 60, time.time() - 60))
    assert b.acquire_lock("k", "run-b", acquire_timeout=2) and b.is_lock_holder("k", "run-b")


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    import os

    import loraflow.store.locks as locks

    monkeypatch.setattr(locks, "HEARTBEAT_SECONDS", 0.05)
    locks._HEARTBEAT.clear()  # a fresh heartbeat thread with the short period
    a = AtomicFileLockManager(tmp_path)
    assert a.acquire_lock("k", "run-a")
    os.utime(tmp_path / "k.lock", (0, 0))
    deadline = time.time() + 5
    while os.stat(tmp_path / "k.lock").st_mtime < time.time() - 10:
        assert time.time() < deadline, "the heartbeat never touched the lock"
        time.sleep(0.02)
    a.release_lock("k", "run-a")
    locks._HEARTBEAT.clear()


@pytest.mark.parametrize("content", ["", '{"holder": "run-a", "pi'], ids=["empty", "cut off"])
def test_a_lock_file_with_no_readable_holder_is_broken_once_older_than_the_stale_limit(tmp_path, content):
    """A crash or a full disk can leave a lock file empty or cut off. (Before: json.loads failed on every later
    run of the config.)"""
    import os

    path = tmp_path / "k.lock"
    path.write_text(content)
    waiter = AtomicFileLockManager(tmp_path, stale_seconds=60)
    assert waiter.acquire_lock("k", "run-b", acquire_timeout=0.3) is False  # young: it may still be explained
    assert waiter.is_locked("k")
    os.utime(path, (time.time() - 61, time.time() - 61))
    assert waiter.acquire_lock("k", "run-b", acquire_timeout=5) and waiter.is_lock_holder("k", "run-b")


def test_stage_locks_live_beside_a_local_output_folder_whoever_stores_the_results(tmp_path):
    """Two machines writing one mounted output_dir, each with its own cache and Prefect storage, share the locks.
    (Before: only with a local run.result_storage; otherwise each machine locked in its own cache.)"""
    from tasks.storage import lock_folder

    shared = str(tmp_path / "nfs" / "runs")
    a = lock_folder(shared, None, tmp_path / "machine-a" / "cache")
    b = lock_folder(shared, None, tmp_path / "machine-b" / "cache")
    assert a == b == tmp_path / "nfs" / "runs" / ".locks"
    assert lock_folder("s3://bucket/runs", str(tmp_path / "results"), tmp_path / "c") == tmp_path / "results" / ".locks"
    assert lock_folder("s3://bucket/runs", None, tmp_path / "c") == tmp_path / "c" / "locks"
