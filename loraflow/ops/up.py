"""`loraflow up`: a local Prefect server, the loraflow work pool and deployments, and a worker.

Everything a user needs to trigger fine-tunes from the UI on one machine, in one command:
  1. `prefect server start` on 127.0.0.1 (another --host needs PREFECT_SERVER_API_AUTH_STRING), with CSRF
     protection on and cross-origin requests allowed only from the UI's own origins;
  2. the `process` work pool with a concurrency limit of 1, and a `gpu` tag concurrency limit of 1
     (the train and evaluate tasks carry that tag), so one GPU never runs two trainings at once;
  3. `prefect deploy --all --prefect-file deployments/prefect.yaml`;
  4. a worker on the pool, with LORAFLOW_PROJECT_DIR pointing at this checkout;
  5. `loraflow watch data/incoming`: new data there emits `loraflow.data.updated`, and the retraining
     deployment's trigger starts a run.
Ctrl-C (or SIGTERM) stops the watcher, the worker and the server.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loraflow.ops.tempserver import LEASE_STORAGE
from loraflow.procs import stop_groups

REPO = Path(__file__).resolve().parents[2]
GPU_TAG = "gpu"
WATCHED = "data/incoming"  # the retraining deployment's data folder (deployments/prefect.yaml)


def _health(api_url: str, auth: str | None) -> bool:
    request = urllib.request.Request(f"{api_url}/health")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)
    if check and done.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed: {(done.stdout + done.stderr).strip()[-2000:]}")
    return done


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ui_origins(host: str, port: int) -> str:
    """The origins the UI is served from: the only ones whose pages may call the API from a browser."""
    hosts = ["127.0.0.1", "localhost"] + ([] if host in (*LOOPBACK, "0.0.0.0", "::") else [host])
    return ",".join(f"http://{h}:{port}" for h in hosts)


def check_host(host: str, env: dict[str, str]) -> None:
    """A server beyond loopback must refuse requests it cannot authenticate."""
    if host not in LOOPBACK and not env.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise ValueError(f"--host {host} serves the API beyond this machine, and without a login anyone who reaches "
                         "it can run code on it: set PREFECT_SERVER_API_AUTH_STRING=user:password (the UI and every "
                         "client then log in), or keep the default --host 127.0.0.1 and tunnel (ssh -L 4200:127.0.0.1:4200)")


def environment(host: str, port: int) -> dict[str, str]:
    """The environment of the server, worker, watcher and our own clients. By default no web page can drive the
    API: CSRF protection is on (Prefect's clients and UI send the token) and cross-origin requests are allowed only
    from the UI's own origins (override with PREFECT_SERVER_CORS_ALLOWED_ORIGINS)."""
    env = {**os.environ, "PREFECT_API_URL": f"http://{host}:{port}/api", "LORAFLOW_PROJECT_DIR": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE}
    env.setdefault("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "true")
    env.setdefault("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", ui_origins(host, port))
    if env.get("PREFECT_SERVER_API_AUTH_STRING") and not env.get("PREFECT_API_AUTH_STRING"):
        env["PREFECT_API_AUTH_STRING"] = env["PREFECT_SERVER_API_AUTH_STRING"]  # our own clients log in
    return env


def start(host: str = "127.0.0.1", port: int = 4200, pool: str = "loraflow", log_dir: Path | None = None,
          startup_timeout: float = 300, watch: bool = True,
          started: list[subprocess.Popen] | None = None) -> list[subprocess.Popen]:
    """Start server + worker (+ the data watcher) and deploy; returns the processes (already running). Each one is
    also appended to `started` as it starts, so an interrupted start-up can stop what it started."""
    started = [] if started is None else started
    env = environment(host, port)
    check_host(host, env)
    log_dir = Path(log_dir or REPO / "runs" / "prefect-up")
    log_dir.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                              env=env, cwd=REPO, stdout=open(log_dir / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    started.append(server)
    deadline = time.time() + startup_timeout
    while not _health(env["PREFECT_API_URL"], env.get("PREFECT_API_AUTH_STRING")):
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"the Prefect server did not start: see {log_dir / 'server.log'}")
        time.sleep(1)
    _prefect("work-pool", "create", pool, "--type", "process", "--overwrite", env=env)
    _prefect("work-pool", "set-concurrency-limit", pool, "1", env=env)
    if GPU_TAG not in _prefect("concurrency-limit", "ls", env=env).stdout:
        _prefect("concurrency-limit", "create", GPU_TAG, "1", env=env)
    deployments = REPO / "deployments" / "prefect.yaml"
    _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(deployments), env=env)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                              env=env, cwd=REPO, stdout=open(log_dir / "worker.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    started.append(worker)
    if not watch:
        return [server, worker]
    watcher = subprocess.Popen([sys.executable, "-m", "loraflow.cli.main", "watch", WATCHED, "--every", "30s", "--quiet", "10s"],
                               env=env, cwd=REPO, stdout=open(log_dir / "watch.log", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    started.append(watcher)
    return [server, worker, watcher]


def stop(processes: list[subprocess.Popen]) -> None:
    stop_groups(processes, grace=60)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, docker stop) stops everything as Ctrl-C does


def main(host: str, port: int, pool: str) -> int:
    try:
        check_host(host, os.environ)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    processes: list[subprocess.Popen] = []
    # One try from the moment SIGTERM is ours: wherever Ctrl-C or SIGTERM lands (start-up, the message, serving),
    # everything started is stopped, and `up` exits 0; a failed start-up also leaves nothing running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start(host, port, pool, started=processes)
        print(f"Prefect UI: http://{host}:{port}  (work pool '{pool}', logs in runs/prefect-up/)\n"
              f"Trigger a run:  PREFECT_API_URL=http://{host}:{port}/api prefect deployment run "
              "loraflow-finetune/finetune --params '{\"cfg\": {\"train\": {\"max_steps\": 8}}}'\n"
              f"New .jsonl files in {WATCHED}/ start the retraining deployment (watcher log: runs/prefect-up/watch.log).\n"
              "Ctrl-C (or SIGTERM) stops the watcher, the worker and the server.", flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        print("error: the server or the worker exited: see runs/prefect-up/*.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stopping short
        stop(processes)
