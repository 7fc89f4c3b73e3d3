"""Stage locks that survive their holder's crash: two runs of one config compute a stage once, and a
killed run never blocks the next.

Atomic: the holder is written to a private temporary file first and published with `os.link`, which
either creates the lock file whole or fails because the lock exists (local disks and NFS); Prefect's
`FileSystemLockManager` let a racing run read an empty lock ("EOF while parsing a value").

Crash-proof: the lock file names its holder's host, boot id, pid and the pid's start time, and the
holding process touches the file every `HEARTBEAT_SECONDS` while it holds it (a daemon thread, so a
six-hour training run keeps its lock). A waiter breaks a lock only when its holder is gone: on the same
machine, when that pid is dead or is now another process; on another machine, when the heartbeat is
older than `stale_seconds`. Never merely because the lock is old, except a lock file with no holder recorded
(empty or cut off: a crash or a full disk), which is broken once it is older than `stale_seconds`. Breaking is serialized by a guard
file (`flock`), and re-checked under it, so two waiters cannot both break and one of them steal the
lock that the other just took. A waiter whose process is exiting (its main thread has ended after a
SIGTERM or SIGINT) stops waiting at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio

from loraflow.procs import gone, identity, on_this_machine

POLL_SECONDS = 0.1
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 120.0  # default staleness for holders on other machines (RunConfig.lock_stale_seconds)

_HELD: set[Path] = set()  # lock files this process holds: the heartbeat thread touches them
_HELD_LOCK = threading.Lock()
_HEARTBEAT: list[threading.Thread] = []


class LockWaitAbandoned(RuntimeError):
    """The process is exiting (SIGTERM/SIGINT ended its main thread) while a stage waited for a lock."""


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_SECONDS)
        with _HELD_LOCK:
            held = list(_HELD)
        for path in held:
            try:
                os.utime(path)
            except OSError:
                pass


def _hold(path: Path) -> None:
    with _HELD_LOCK:
        _HELD.add(path)
        if not _HEARTBEAT or not _HEARTBEAT[0].is_alive():
            _HEARTBEAT[:] = [threading.Thread(target=_beat, name="loraflow-lock-heartbeat", daemon=True)]
            _HEARTBEAT[0].start()


def _unhold(path: Path) -> None:
    with _HELD_LOCK:
        _HELD.discard(path)


def abandoned(info: dict, heartbeat_age: float, stale_seconds: float) -> str | None:
    """Why the lock `info` (as written by `AtomicFileLockManager`) may be broken, or None while its holder lives."""
    if "holder" not in info:  # unreadable: nobody can be asked, so its age decides
        if heartbeat_age > stale_seconds:
            return f"its file records no holder (empty or unreadable) and is {heartbeat_age:.0f} s old"
        return None
    expires = info.get("expires")
    if expires is not None and datetime.fromisoformat(expires) < datetime.now(timezone.utc):
        return "its hold timeout passed"
    if on_this_machine(info):
        if gone(info):
            return f"its holder (pid {info['pid']} on this machine) is gone"
        return None  # alive here: however old, the lock stands
    if heartbeat_age > stale_seconds:
        return f"its holder on {info.get('host', '?')} sent no heartbeat for {heartbeat_age:.0f} s"
    return None


class AtomicFileLockManager:
    """A `prefect.locking.protocol.LockManager` backed by one file per cache key."""

    def __init__(self, lock_files_directory: Path, stale_seconds: float = STALE_SECONDS) -> None:
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()
        self.stale_seconds = stale_seconds

    def _path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.lock"

    def _load(self, key: str) -> tuple[dict, os.stat_result] | None:
        """The lock's holder and file status; an unreadable file (empty or cut off by a crash or a full disk) reads
        as a lock with no holder recorded."""
        path = self._path(key)
        try:
            with open(path) as fh:
                text, stat = fh.read(), os.fstat(fh.fileno())
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        return (info if isinstance(info, dict) else {}), stat

    def _read(self, key: str) -> dict | None:
        """The lock's holder, or None when the key is free (a lock whose holder is gone is broken)."""
        found = self._load(key)
        if found is None:
            return None
        info, stat = found
        if abandoned(info, time.time() - stat.st_mtime, self.stale_seconds) and self._break(key, stat.st_ino):
            return None
        return info

    def _break(self, key: str, inode: int) -> bool:
        """Remove the abandoned lock with this inode, re-checked under the guard; False if it changed."""
        with open(self.lock_files_directory / f".{key}.guard", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                found = self._load(key)
                if found is None:
                    return True
                info, stat = found
                reason = abandoned(info, time.time() - stat.st_mtime, self.stale_seconds)
                if stat.st_ino != inode or reason is None:
                    return False  # another waiter broke it and a live run holds a new one
                self._path(key).unlink(missing_ok=True)
                logging.getLogger("loraflow").warning("lock %s: broken, %s", key, reason)  # in the task's log
                return True
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def _try_create(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        expires = None if hold_timeout is None else (datetime.now(timezone.utc) + timedelta(seconds=hold_timeout)).isoformat()
        tmp = self.lock_files_directory / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"holder": holder, "expires": expires, **identity()}))
        try:
            os.link(tmp, self._path(key))
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _hold(self._path(key))
        return True

    def _wait(self, deadline: float | None) -> bool:
        """Sleep one poll; False when the deadline passed. Raises when the process is exiting."""
        if not threading.main_thread().is_alive():
            raise LockWaitAbandoned("the process is exiting: stopped waiting for a stage lock")
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
        return True

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self._try_create(key, holder, hold_timeout):
                return True
            info = self._read(key)
            if info is not None and info.get("holder") == holder:
                return True
            if info is not None and not self._wait(deadline):
                return False

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        info = self._read(key)
        if info is None:
            raise ValueError(f"No lock for transaction with key {key}")
        if info.get("holder") != holder:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        _unhold(self._path(key))
        self._path(key).unlink(missing_ok=True)

    def is_locked(self, key: str) -> bool:
        return self._read(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self._read(key)
        return info is not None and info.get("holder") == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if not self._wait(deadline):
                return False
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
