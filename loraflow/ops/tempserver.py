"""The temporary Prefect server of a `loraflow run` (or `sweep`, `export`) started without PREFECT_API_URL.

Prefect's own temporary server is a child in the terminal's process group: Ctrl-C kills it at once, and the
flow's crash handler then retries against a dead server for minutes. Ours runs in its own session, so a
Ctrl-C reaches the flow (which records the run as crashed on a live server and exits) and the server is
stopped last. Each one leaves `<PREFECT_HOME>/loraflow-servers/<pid>.json` naming the process that owns it;
a server whose owner was killed (SIGKILL, OOM) is stopped by the next run that starts one. Concurrency
leases go to files (`LEASE_STORAGE`), so a slot held by a killed run can be found and released by the next
(`tasks.slots`), whichever server process is up by then.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loraflow.procs import alive, gone, identity, stop_groups

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
_APP = "prefect.server.api.server:create_app"
_CURRENT: list[str] = []  # the API URL of the temporary server this process runs its flows on, if any


def current() -> str | None:
    """The API URL of this process's temporary server, or None (a server someone else runs, or none)."""
    return _CURRENT[-1] if _CURRENT else None


def _home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser()


def _records() -> Path:
    return _home() / "loraflow-servers"


def _is_our_server(pid: int) -> bool:
    try:
        return _APP in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def stop_orphans() -> list[int]:
    """Stop the temporary servers whose owning run is gone; returns their pids."""
    stopped = []
    for record in sorted(_records().glob("*.json")):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if gone(info["owner"]) is not True:  # its run is alive (or on another machine sharing this home)
            continue
        if alive(info["pid"]) and _is_our_server(info["pid"]):
            os.killpg(info["pid"], signal.SIGTERM)
            _wait_gone(info["pid"], 10) or os.killpg(info["pid"], signal.SIGKILL)
            stopped.append(info["pid"])
        record.unlink(missing_ok=True)
    return stopped


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _drain_to(server: subprocess.Popen) -> None:
    """Send the logs and events still queued to the server before it stops (else the process retries against a
    dead server at exit, for a minute or more)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    if server.poll() is None:
        for worker in (APILogWorker, EventsWorker):
            try:
                worker.drain_all(timeout=5)
            except Exception:  # noqa: BLE001 - a log that cannot be sent must not keep the run from ending
                pass


@contextmanager
def temporary_server(startup_timeout: float = 180) -> Iterator[str]:
    """A Prefect API on 127.0.0.1 for this process's flows, in its own session; yields its API URL and stops
    it on exit, after the flow has recorded its end."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    stop_orphans()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    records = _records()
    records.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE}
    env.pop("PREFECT_API_URL", None)
    log = open(records / f"server-{port}.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", _APP, "--host", "127.0.0.1", "--port",
                               str(port), "--log-level", "error", "--lifespan", "on"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)  # a Ctrl-C in the terminal does not reach it
    record = records / f"{server.pid}.json"
    record.write_text(json.dumps({"pid": server.pid, "owner": identity(), "port": port}))
    started = False
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not start: see {log.name}")
            time.sleep(0.2)
        started = True
        _CURRENT.append(url)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if url in _CURRENT:
            _CURRENT.remove(url)
        if started:
            _drain_to(server)
        stop_groups([server], grace=10)
        log.close()
        record.unlink(missing_ok=True)
        if started:
            Path(log.name).unlink(missing_ok=True)
