"""Which process wrote a file, and whether it still runs: the one rule that stage locks, temporary servers,
concurrency-slot holders and the store's reader records share.

An identity is the host, its boot id, the pid and the pid's start time, so a pid reused after a reboot or by
another process does not pass for the writer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def identity() -> dict[str, object]:
    """This process: what a file it writes records about its writer."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": pid, "pid_start": pid_start(pid)}


def alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (a zombie does not)."""
    return pid_start(pid) is not None


def on_this_machine(info: dict) -> bool:
    return info.get("host") == socket.gethostname() and info.get("boot_id") == boot_id() and info.get("pid") is not None


def gone(info: dict) -> bool | None:
    """For an `identity()` record: True when its process was of this machine and no longer runs, False while it
    runs, None when it is another machine's (or from before a reboot: then gone too)."""
    if info.get("host") == socket.gethostname() and info.get("boot_id") not in (None, boot_id()):
        return True
    if not on_this_machine(info):
        return None
    return pid_start(int(info["pid"])) != info.get("pid_start")


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """`proc`'s exit code, waiting up to `timeout` s for it; None if it still runs. Unlike `Popen.wait`, it holds
    after an interrupt: Ctrl-C or SIGTERM raised as KeyboardInterrupt right after `Popen.poll()` took its internal
    lock, and before its `try`, leaves that lock held, so `poll()` says "running" forever and `wait(timeout)` spins
    to its timeout. This waits on the pid itself (the callers are single-threaded by then)."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already, its code unknown: what Popen says then too
            proc.returncode = 0
            break
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
    return proc.returncode


def stop_groups(processes: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each process's group (each was started with `start_new_session=True`), latest first; SIGKILL a
    group whose leader has not exited `grace` s later."""
    for proc in reversed(processes):
        if wait_exit(proc, 0) is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(processes):
        if wait_exit(proc, grace) is None:
            os.killpg(proc.pid, signal.SIGKILL)
            wait_exit(proc, grace)
