"""Which process wrote a file, and whether it still runs: the one rule that stage locks, temporary servers,
concurrency-slot holders and the store's reader records share.

An identity is the host, its boot id, the pid and the pid's start time, so a pid reused after a reboot or by
another process does not pass for the writer.
"""

from __future__ import annotations

import os
import socket
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
