"""Stage locks that two runs can race for: the lock file appears with its content, never empty.

Prefect's `FileSystemLockManager` creates the lock file and *then* writes the holder into it; a run
that reads the file in between gets empty JSON and its task fails ("EOF while parsing a value").
Here the holder is written to a private temporary file first and published with `os.link`, which
either creates the lock file whole or fails because the lock exists (atomic on local disks and NFS).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio

POLL_SECONDS = 0.1


class AtomicFileLockManager:
    """A `prefect.locking.protocol.LockManager` backed by one file per cache key."""

    def __init__(self, lock_files_directory: Path) -> None:
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.lock"

    def _read(self, key: str) -> dict | None:
        """The lock's holder and expiry, or None when the key is free (an expired lock is removed)."""
        try:
            info = json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return None
        expires = info.get("expires")
        if expires is not None and datetime.fromisoformat(expires) < datetime.now(timezone.utc):
            self._path(key).unlink(missing_ok=True)
            return None
        return info

    def _try_create(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        expires = None if hold_timeout is None else (datetime.now(timezone.utc) + timedelta(seconds=hold_timeout)).isoformat()
        tmp = self.lock_files_directory / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"holder": holder, "expires": expires}))
        try:
            os.link(tmp, self._path(key))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self._try_create(key, holder, hold_timeout):
                return True
            info = self._read(key)
            if info is not None and info["holder"] == holder:
                return True
            if info is not None:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_SECONDS)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        info = self._read(key)
        if info is None:
            raise ValueError(f"No lock for transaction with key {key}")
        if info["holder"] != holder:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        self._path(key).unlink(missing_ok=True)

    def is_locked(self, key: str) -> bool:
        return self._read(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self._read(key)
        return info is not None and info["holder"] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
