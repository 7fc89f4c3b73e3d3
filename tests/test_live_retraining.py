"""Retraining on a live Prefect server: `loraflow.data.updated`, the watcher's debounce, the deployment trigger, and
a person's approval before a promotion (suspend, resume with input, timeout).

The watcher's rules are checked on real files with a counting emitter. End to end, `loraflow up`'s pieces
(a real `prefect server start` with its event and trigger services, the process work pool, a worker) run a
retraining deployment on the tiny model whose trigger is the one shipped in deployments/prefect.yaml, pointed
at this test's resource; the real `loraflow watch` CLI watches the data folder in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import pytest
import yaml

from loraflow.ops.events import EVENT, Watcher, content_fingerprint, parse_seconds, resource
from loraflow.ops.up import REPO
from test_flow_e2e import tiny_config
from tests_support import live_stack, write_examples


def _rows(path: Path, n: int, offset: int) -> list[str]:
    tmp = path.with_name(f"_rows-{uuid.uuid4().hex[:6]}.tmp")
    rows = write_examples(tmp, n + offset).read_text().splitlines()[offset:]
    tmp.unlink()
    return [r + "\n" for r in rows]


def test_the_watcher_emits_once_per_settled_change_and_not_for_a_file_half_written(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "batch-1.jsonl").write_text("".join(_rows(folder / "x", 8, 0)))
    sent: list[str] = []
    watcher = Watcher(str(folder), quiet=0.4, state_file=tmp_path / "state.json", emit=lambda s, n, f: sent.append(f))
    assert watcher.poll() is None and sent == []  # the first start takes what is there as the baseline

    # A file written in two halves, the second after a pause shorter than the quiet period: one event, for the whole.
    half = _rows(folder / "x", 8, 8)
    with open(folder / "batch-2.jsonl", "w") as fh:
        fh.writelines(half[:4])
    assert watcher.poll() is None
    time.sleep(0.25)
    assert watcher.poll() is None
    with open(folder / "batch-2.jsonl", "a") as fh:
        fh.writelines(half[4:])
    assert watcher.poll() is None  # changed again: the quiet period starts over
    time.sleep(0.25)
    assert watcher.poll() is None and sent == []  # 0.5 s after the first half, but only 0.25 s after the second
    time.sleep(0.3)
    assert watcher.poll() == content_fingerprint(str(folder)) and len(sent) == 1
    for _ in range(3):
        time.sleep(0.15)
        assert watcher.poll() is None
    assert len(sent) == 1

    # A restarted watcher remembers what it announced; the same bytes rewritten (new mtime) are no news either.
    again = Watcher(str(folder), quiet=0.0, state_file=tmp_path / "state.json", emit=lambda s, n, f: sent.append(f))
    (folder / "batch-2.jsonl").write_text("".join(half))
    again.poll()
    assert again.poll() is None and len(sent) == 1


def test_watch_and_emit_refuse_bad_input_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "loraflow.cli.main", "emit-data-updated", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "set PREFECT_API_URL" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    done = subprocess.run([sys.executable, "-m", "loraflow.cli.main", "watch", str(tmp_path), "--every", "soon"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'soon' is not a duration: write e.g. 30s" in done.stderr
    assert parse_seconds("90") == 90 and parse_seconds("2m") == 120 and parse_seconds("1.5h") == 5400


# ---- end to end, on a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with live_stack(tmp_path_factory.mktemp("events"), watch=False) as running:  # the tests start their own watchers
        yield running


@pytest.fixture(autouse=True)
def _on_stack(request):
    """Point this test's Prefect client at the module's server: a session's test harness (other modules) would
    otherwise keep its own PREFECT_API_URL in Prefect's settings context, over the environment."""
    if "stack" not in request.fixturenames:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{request.getfixturevalue('stack')['port']}/api"}):
        yield


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def call():
        async with get_client() as client:
            return await coro_fn(client)

    return anyio.run(call)


def _events(resource_id: str) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    page = _api(lambda c: c.read_events(EventFilter(event=EventNameFilter(name=[EVENT]),
                                                    resource=EventResourceFilter(id=[resource_id])), limit=50))
    return sorted(page.events, key=lambda e: e.occurred)


def _runs(deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = _api(lambda c: c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))))
    return sorted(runs, key=lambda r: r.created)


def _until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def shipped_trigger(resource_id: str):
    """deployments/prefect.yaml's retraining trigger, matching `resource_id` instead of loraflow.data.incoming."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    (retrain,) = [d for d in spec["deployments"] if d["name"] == "retrain-nightly"]
    (trigger,) = retrain["triggers"]
    assert trigger["match"]["prefect.resource.id"] == "loraflow.data.incoming" and trigger["expect"] == [EVENT]
    return DeploymentEventTrigger(**{**trigger, "match": {"prefect.resource.id": resource_id}})


@pytest.mark.slow
def test_new_data_in_a_watched_folder_starts_exactly_one_retraining_run(stack, tiny_llama_dir, tmp_path):
    """Slow tier: a real server, a worker and a deployment. Everyday: the watcher's rules in
    test_the_watcher_emits_once_per_settled_change_and_not_for_a_file_half_written, the retraining flow on the tiny
    model in test_retrain.py::test_retraining_promotes_only_what_beats_the_champion."""
    from prefect import flow

    from loraflow.ops.registry import Registry

    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "batch-1.jsonl").write_text("".join(_rows(folder / "x", 48, 0)))
    cfg = tiny_config(tmp_path, folder, tiny_llama_dir, max_steps=4, save_steps=4)
    name = f"events-{uuid.uuid4().hex[:6]}"
    resource_id = resource(str(folder), name)["prefect.resource.id"]
    remote = flow.from_source(source=str(REPO), entrypoint="flows/retrain.py:retrain")
    deployment_id = remote.deploy(name=name, work_pool_name="loraflow", parameters={"cfg": cfg.model_dump(mode="json")},
                                  triggers=[shipped_trigger(resource_id)], print_next_steps=False)
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{stack['port']}/api",
           "LORAFLOW_CACHE": str(tmp_path / "cache")}
    watcher = subprocess.Popen([sys.executable, "-m", "loraflow.cli.main", "watch", str(folder), "--every", "1s", "--quiet",
                                "4s", "--name", name], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(12)  # the server's trigger service loads new automations on its ~5 s evaluation loop
        assert _events(resource_id) == [] and _runs(deployment_id) == []  # what was there at start is no news

        # A new file lands (written whole): one event, one run, its decision in the registry.
        (folder / "batch-2.jsonl").write_text("".join(_rows(folder / "x", 16, 48)))
        landed = time.time()
        (event,) = _until(lambda: _events(resource_id), 60, "the data event")
        assert event.payload["fingerprint"] == content_fingerprint(str(folder))
        (run,) = _until(lambda: _runs(deployment_id), 60, "the triggered flow run")
        assert run.parameters["data_event"]["fingerprint"] == event.payload["fingerprint"]
        assert run.parameters["data_event"]["event_id"] == str(event.id)
        done = _until(lambda: (r := _api(lambda c: c.read_flow_run(run.id))).state.is_final() and r, 600,
                      "the retraining run to finish")
        assert done.state.is_completed(), done.state
        started = done.start_time.timestamp()
        print(f"file landed -> event {event.occurred.timestamp() - landed:.1f} s -> run started "
              f"{started - landed:.1f} s after the file landed")
        (candidate,) = Registry(tmp_path / "runs" / "registry").read().candidates
        assert candidate.promoted and candidate.trigger.event_id == str(event.id)
        assert candidate.trigger.fingerprint == event.payload["fingerprint"]

        # A file written slowly, in two halves 2 s apart (less than the 4 s quiet period): one event, after both.
        rows = _rows(folder / "x", 16, 64)
        with open(folder / "batch-3.jsonl", "w") as fh:
            fh.writelines(rows[:8])
        time.sleep(2)
        with open(folder / "batch-3.jsonl", "a") as fh:
            fh.writelines(rows[8:])
        _until(lambda: len(_events(resource_id)) == 2, 60, "the second data event")
        time.sleep(8)  # two quiet periods more: no third event
        events = _events(resource_id)
        assert len(events) == 2 and events[1].payload["fingerprint"] == content_fingerprint(str(folder))
        _until(lambda: len(_runs(deployment_id)) == 2, 60, "the second triggered run")
        time.sleep(5)
        runs = _runs(deployment_id)
        assert len(runs) == 2
        # The second run has shown what it must; cancelled, it frees the pool's one slot for the next test's runs.
        from prefect.states import Cancelling

        (second,) = [r for r in runs if r.id != run.id]
        _api(lambda c: c.set_flow_run_state(second.id, Cancelling(), force=True))
        _until(lambda: _api(lambda c: c.read_flow_run(second.id)).state.is_final(), 120, "the second run to end")
    finally:
        os.killpg(watcher.pid, 15)
        out, _ = watcher.communicate(timeout=30)
        print(out[-2000:])
    assert out.count(f"{EVENT}:") == 2


# ---- a person's approval, through the API ------------------------------------------------------------


def _state(run_id) -> str:
    return _api(lambda c: c.read_flow_run(run_id)).state.name


def _wait(run_id, name: str, timeout: float, what: str) -> None:
    """Until the run is in state `name`; fails at once when it ends in another final state."""
    def reached() -> bool:
        state = _api(lambda c: c.read_flow_run(run_id)).state
        if state.name != name and state.is_final():
            raise AssertionError(f"{what}: the run ended {state.name}: {state.message}")
        return state.name == name

    _until(reached, timeout, what)


def _deploy_retrain(name: str, cfg) -> str:
    from prefect import flow

    remote = flow.from_source(source=str(REPO), entrypoint="flows/retrain.py:retrain")
    return remote.deploy(name=name, work_pool_name="loraflow", parameters={"cfg": cfg.model_dump(mode="json")},
                         print_next_steps=False)


def _start(deployment_id, cfg_patch: dict | None = None):
    return _api(lambda c: c.create_flow_run_from_deployment(deployment_id, parameters={"cfg": cfg_patch or {}}))


@pytest.mark.slow
def test_a_promotion_waits_for_a_person_and_follows_the_answer(stack, tiny_llama_dir, tmp_path):
    """Slow tier: a real server, a worker and a deployment. Everyday: the decision and the approval table in
    test_retrain.py (test_decision_rule_and_atomic_registry, test_the_approval_table_keeps_every_row_and_shows_a_dash_for_a_missing_score,
    test_approval_outside_a_deployment_run_is_refused_before_any_stage)."""
    from prefect.flow_runs import resume_flow_run

    from loraflow.ops.registry import Registry

    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "batch-1.jsonl").write_text("".join(_rows(folder / "x", 48, 0)))
    cfg = tiny_config(tmp_path, folder, tiny_llama_dir, max_steps=4, save_steps=4)
    may_set = [*cfg.run.run_may_set, "promotion.margin", "promotion.rule", "promotion.approval_timeout_hours"]
    cfg = cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"require_approval": True}),
                                 "export": cfg.export.model_copy(update={"enabled": False}),
                                 "run": cfg.run.model_copy(update={"run_may_set": may_set})})  # its runs try rules
    deployment_id = _deploy_retrain(f"approval-{uuid.uuid4().hex[:6]}", cfg)
    registry = Registry(tmp_path / "runs" / "registry")

    # 1. The first challenger would be promoted: the run suspends, the registry says pending, nothing is champion.
    first = _start(deployment_id)
    _wait(first.id, "Suspended", 600, "the first run to suspend for approval")
    (pending,) = registry.read().candidates
    assert pending.approval.status == "pending" and not pending.promoted and registry.champion() is None
    assert "no champion yet" in pending.approval.rule_reason and pending.approval.stages["trained"]["stage"] == "train"

    # 2. While it waits, the worker slot (pool limit 1) is free: a second challenger (new data) trains and asks too.
    (folder / "batch-2.jsonl").write_text("".join(_rows(folder / "x", 16, 48)))
    second = _start(deployment_id, {"promotion": {"margin": -1.0, "rule": "mean"}})  # the rule would promote it
    _wait(second.id, "Suspended", 600, "the second run to suspend while the first still waits")
    assert _state(first.id) == "Suspended" and len(registry.read().candidates) == 2

    # 3. Approve the first through the API: it resumes, reruns nothing, and becomes champion with the answer recorded.
    resume_flow_run(first.id, run_input={"approve": True, "approver": "Ana", "comment": "val gain holds"})
    _wait(first.id, "Completed", 300, "the approved run to complete")
    champion = registry.champion()
    assert champion.id == pending.id and champion.approval.status == "approved" and champion.approval.approver == "Ana"
    assert champion.reason.startswith("approved by Ana (val gain holds)")

    # 4. Reject the second: the champion stays; the answer is in the registry.
    resume_flow_run(second.id, run_input={"approve": False, "approver": "Bo", "comment": "wait for more data"})
    _wait(second.id, "Completed", 300, "the rejected run to complete")
    rejected = registry.read().candidates[1]
    assert not rejected.promoted and rejected.approval.status == "rejected" and rejected.approval.comment == "wait for more data"
    assert registry.champion().id == champion.id

    # 5. No answer in time is a recorded rejection (and Prefect fails the suspended run at the deadline). The second
    # challenger again (every stage cached), now against the champion, by a rule of another margin: asked anew.
    third = _start(deployment_id, {"promotion": {"margin": -0.5, "rule": "mean", "approval_timeout_hours": 0.005}})
    _wait(third.id, "Suspended", 600, "the third run to suspend")
    _wait(third.id, "Failed", 120, "Prefect to fail the unanswered run at its deadline")
    expired = registry.expire().candidates[2]
    assert expired.train_fingerprint == rejected.train_fingerprint and expired.champion_id == champion.id
    assert not expired.promoted and expired.approval.status == "expired"
    assert expired.reason.startswith("rejected: no answer within 0.005 hours")
    assert registry.champion().id == champion.id


@pytest.mark.slow
def test_a_deployment_run_that_widens_its_privileges_fails_before_any_stage(stack, tiny_llama_dir, tmp_path):
    """Through the real server and worker: a run of a deployment asks for trust_remote_code and for another output
    folder; it fails in one line naming the field, and nothing is written. (Before: it ran with them.) Everyday:
    test_config.py::test_a_deployment_run_cannot_widen_its_own_privileges."""
    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=2)
    deployment_id = _deploy_retrain(f"privileges-{uuid.uuid4().hex[:6]}", cfg)
    run = _start(deployment_id, {"model": {"trust_remote_code": True}, "train": {"max_steps": 3}})
    _until(lambda: _state(run.id) in ("Failed", "Crashed", "Completed"), 600, "the run to end")
    state = _api(lambda c: c.read_flow_run(run.id)).state
    assert state.name == "Failed" and "cfg.model.trust_remote_code: a run of this deployment may not set it" in state.message
    assert not (tmp_path / "runs" / "data").exists()


@pytest.mark.slow
def test_no_other_web_page_can_drive_the_api_of_loraflow_up(stack):
    """Real HTTP against `loraflow up`'s server, as a page on another site would send it from a user's browser: the
    CORS preflight names no origin but the UI's, and a state-changing request without Prefect's CSRF token is
    refused. (Before: `access-control-allow-origin: *`, and the POST got 200.) The clients and the UI send the
    token: every other test in this module, and the browser test (tests/test_e2e_ui.py), run through it.
    Everyday: the settings that do it in tests/test_up.py::test_the_api_takes_csrf_tokens_and_only_the_uis_own_origin."""
    import urllib.error
    import urllib.request

    api = f"http://127.0.0.1:{stack['port']}/api"

    def send(method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, dict[str, str]]:
        request = urllib.request.Request(f"{api}{path}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    _, evil = send("OPTIONS", "/deployments/filter", {"Origin": "http://evil.example", **preflight})
    assert evil.get("access-control-allow-origin") not in ("*", "http://evil.example"), evil
    ui = f"http://127.0.0.1:{stack['port']}"
    code, own = send("OPTIONS", "/deployments/filter", {"Origin": ui, **preflight})
    assert code == 200 and own.get("access-control-allow-origin") == ui, own
    code, _ = send("POST", "/deployments/filter", {"Content-Type": "application/json", "Origin": "http://evil.example"}, b"{}")
    assert code == 403, code  # no CSRF token: refused before it reaches the deployments


def test_loraflow_up_refuses_a_public_host_without_a_login(monkeypatch, capsys):
    """Not slow: refused before anything starts."""
    from loraflow.cli.main import main

    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    assert main(["up", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --host 0.0.0.0 serves the API beyond this machine")
    assert "set PREFECT_SERVER_API_AUTH_STRING=user:password" in err
