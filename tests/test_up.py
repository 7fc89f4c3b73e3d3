"""`loraflow up`'s server settings, without starting it: secure by default. The real server refusing a foreign
page's requests is tests/test_live_retraining.py::test_no_other_web_page_can_drive_the_api_of_loraflow_up (slow)."""

from __future__ import annotations

import pytest

from loraflow.ops.up import check_host, environment


def test_the_api_takes_csrf_tokens_and_only_the_uis_own_origin(monkeypatch):
    for name in ("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "PREFECT_SERVER_CORS_ALLOWED_ORIGINS",
                 "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(name, raising=False)
    env = environment("127.0.0.1", 4321)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"  # Prefect's default: off
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321,http://localhost:4321"  # default: *
    assert "PREFECT_API_AUTH_STRING" not in env
    # a login set for the server is what our own clients log in with
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ana:secret")
    assert environment("127.0.0.1", 4321)["PREFECT_API_AUTH_STRING"] == "ana:secret"


def test_serving_beyond_loopback_without_a_login_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="set PREFECT_SERVER_API_AUTH_STRING=user:password"):
        check_host("0.0.0.0", {})
    check_host("0.0.0.0", {"PREFECT_SERVER_API_AUTH_STRING": "ana:secret"})
    for host in ("127.0.0.1", "localhost", "::1"):
        check_host(host, {})


SIGTERM_AT = r"""
import os, signal, subprocess, sys, time
import loraflow.ops.up as up

def start(host, port, pool, started):
    started.append(subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
    print(f"child {started[-1].pid}", file=sys.stderr, flush=True)
    if sys.argv[1] == "during start-up":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

def message(*args, **kw):  # the line saying the UI is up: the signal arrives while it is printed
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)

up.start = start
if sys.argv[1] == "as the UI line is printed":
    up.print = message
sys.exit(up.main("127.0.0.1", 4200, "loraflow"))
"""


@pytest.mark.parametrize("moment", ["during start-up", "as the UI line is printed", "while serving"])
def test_sigterm_at_any_moment_stops_what_up_started_and_exits_cleanly(moment):
    """SIGTERM (kill, systemd, docker stop) wherever `loraflow up` is: it stops every process it started and
    exits 0. (Before: a SIGTERM during start-up re-raised, and one that came as the UI line was printed escaped the
    handler, left the server running and ended `up` by SIGINT: the slow tier's
    test_interrupts.py::test_loraflow_up_stops_everything_it_started_on_sigterm saw exit code -2.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from loraflow.procs import alive

    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_AT, moment], stderr=subprocess.PIPE, text=True)
    child = int(proc.stderr.readline().split()[1])
    if moment == "while serving":
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        deadline = time.time() + 10
        while alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(child), f"up left the process it started running ({moment})"
    finally:
        if alive(child):
            os.killpg(child, signal.SIGKILL)


def test_stopping_is_prompt_even_after_an_interrupt_landed_inside_popen_poll():
    """Ctrl-C or SIGTERM raises KeyboardInterrupt wherever `up` is, also just after `Popen.poll()` took its internal
    lock and before its `try`: the lock stays held (a tight poll loop interrupted by a timer leaves it so about one
    time in five on CPython 3.11), and every later `poll()` says "running" and `wait(timeout)` spins until its
    timeout. (Before: `stop` then waited the full 60 s per process before SIGKILL, and CI's
    test_sigterm_at_any_moment_stops_what_up_started_and_exits_cleanly[while serving] timed out.)"""
    import subprocess
    import threading

    from loraflow.ops.up import stop
    from loraflow.procs import alive

    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    proc._waitpid_lock.acquire()  # the state the interrupt leaves
    stopping = threading.Thread(target=stop, args=([proc],), daemon=True)
    stopping.start()
    stopping.join(timeout=10)
    try:
        assert not stopping.is_alive(), "stop() is still waiting on a process it sent SIGTERM 10 s ago"
        assert not alive(proc.pid) and proc.returncode == -15
    finally:
        if alive(proc.pid):
            proc.kill()
