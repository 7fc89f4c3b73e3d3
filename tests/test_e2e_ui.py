"""End to end through the Prefect UI, in a real headless Chromium (Debian's, driven by Selenium).

`loraflow up` starts a Prefect server on 127.0.0.1, the work pool, the project's deployments and a
worker. A deployment on the tiny test model is added; the test opens its custom-run form, changes
the number of training steps, submits, waits for the run, and finds the ROUGE table on the
Artifacts page. Screenshots are kept in runs/e2e-screenshots/ (printed at the end).
Also: a partial `--params` override keeps the deployment's other values, an invalid value is refused
by the server naming the field, and a server with basic auth refuses a client without credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import anyio
import pytest

from loraflow.ops.up import REPO
from test_flow_e2e import tiny_config
from tests_support import free_port, live_stack, write_examples

pytestmark = pytest.mark.e2e
SHOTS = REPO / "runs" / "e2e-screenshots"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`loraflow up` in-process: server + pool + deployments + worker + watcher, each in its own process."""
    with live_stack(tmp_path_factory.mktemp("e2e")) as running:
        yield running


@pytest.fixture(scope="module")
def tiny_deployment(stack, tiny_llama_dir):
    """A deployment of the fine-tune flow on the tiny model, from this checkout, on the project's pool."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = stack["home"]
    cfg = tiny_config(home, write_examples(home / "toy.jsonl"), tiny_llama_dir, max_steps=4, save_steps=4)
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{stack['port']}/api"}):
        remote = flow.from_source(source=str(REPO), entrypoint="flows/finetune.py:finetune")
        deployment_id = remote.deploy(name="finetune-tiny", work_pool_name="loraflow",
                                      parameters={"cfg": cfg.model_dump(mode="json")}, print_next_steps=False)
    return deployment_id, cfg


def _api(stack, coro_fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{stack['port']}/api"}):
        return anyio.run(call)


def _runs_of(stack, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return _api(stack, lambda c: c.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))))


def _wait_final(stack, flow_run_id, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = _api(stack, lambda c: c.read_flow_run(flow_run_id))
        if run.state and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the e2e test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for a timeout's message
    return webdriver.Chrome(service=Service(driver), options=options)


def _console(browser) -> str:
    """The page's console since the last call (Chromium's log, kept by `_browser`)."""
    return "\n".join(entry["message"] for entry in browser.get_log("browser"))


def _wait_for(browser, predicate, timeout: float = 60, what: str = "the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = predicate()
        except Exception:  # noqa: BLE001 - the element is not there yet
            found = None
        if found:
            return found
        time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "timeout.png"))
    raise AssertionError(f"timed out waiting for {what} (screenshot: {SHOTS / 'timeout.png'}); "
                         f"the page's console:\n{_console(browser)}")


def _submit(browser, button, done, what: str, attempts: int = 3):
    """Click `button()` and return `done()` once it is truthy. On SQLite a loaded server can answer a write 503
    (another of its connections holds the write lock; Prefect's clients retry that, its UI shows "Something went
    wrong"): then, as a user would, close the toast and submit again. Any other refusal fails the test."""
    from selenium.webdriver.common.by import By

    def refused() -> bool:  # the UI's error toast is showing
        return "went wrong" in browser.find_element(By.TAG_NAME, "body").text

    for attempt in range(attempts):
        browser.execute_script("arguments[0].click()", button())
        outcome = _wait_for(browser, lambda: done() or (refused() and "refused"), what=what)
        if outcome != "refused":
            return outcome
        console = _console(browser)
        assert "503" in console, f"the UI refused the form:\n{console}"
        print(f"submit {attempt + 1}: the server answered 503 (SQLite busy); submitting again")
        browser.execute_script("document.querySelectorAll('.p-toast__close-btn, .p-toast__close')"
                               ".forEach(close => close.click())")  # the toast's ×
        _wait_for(browser, lambda: not refused(), what="the error toast to go")
    raise AssertionError(f"the server answered 503 to {attempts} submits ({what})")


def test_custom_run_from_the_ui_form_shows_rouge_in_artifacts(stack, tiny_deployment):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    deployment_id, _ = tiny_deployment
    SHOTS.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{stack['port']}"
    browser = _browser()
    try:
        browser.get(f"{base}/deployments/deployment/{deployment_id}")
        _wait_for(browser, lambda: "finetune-tiny" in browser.page_source, what="the deployment page")
        browser.save_screenshot(str(SHOTS / "1-deployment.png"))

        browser.get(f"{base}/deployments/deployment/{deployment_id}/run")
        steps = _wait_for(browser, lambda: browser.find_element(
            By.XPATH, "//*[normalize-space(text())='Max Steps (Optional)']/following::input[1]"),
            what="the Max Steps field of the custom-run form")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", steps)
        assert steps.get_attribute("value") == "4"
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("6")
        browser.save_screenshot(str(SHOTS / "2-custom-run-form.png"))
        runs = _submit(browser, lambda: browser.find_element(By.CSS_SELECTOR, "button[type=submit]"),
                       lambda: _runs_of(stack, deployment_id), what="the flow run the form created")
        assert len(runs) == 1
        run = _wait_final(stack, runs[0].id)
        browser.get(f"{base}/runs/flow-run/{run.id}")
        _wait_for(browser, lambda: "Completed" in browser.page_source or "Failed" in browser.page_source,
                  what="the flow run page")
        browser.save_screenshot(str(SHOTS / "3-flow-run.png"))
        assert run.state.name == "Completed", run.state
        assert run.parameters["cfg"]["train"]["max_steps"] == 6  # the form's change reached the run

        browser.get(f"{base}/artifacts/key/finetune-tiny-rouge")  # the key's history, one entry per run
        latest = _wait_for(browser, lambda: browser.find_element(By.XPATH, "//a[contains(@href, '/artifacts/artifact/')]"),
                           what="the ROUGE artifact's history on the Artifacts page")
        browser.save_screenshot(str(SHOTS / "4-artifact-history.png"))
        browser.execute_script("arguments[0].click()", latest)
        _wait_for(browser, lambda: "fine-tuned" in browser.page_source and "rougeL" in browser.page_source,
                  what="the ROUGE table")
        browser.save_screenshot(str(SHOTS / "5-artifact-rouge-table.png"))
    finally:
        browser.quit()
    train_dirs = [p for p in (stack["home"] / "runs" / "train").iterdir() if (p / "manifest.json").is_file()]
    steps_trained = {json.loads((p / "train_metrics.json").read_text())["global_step"] for p in train_dirs}
    assert 6 in steps_trained
    print(f"\nscreenshots: {sorted(str(p) for p in SHOTS.glob('*.png'))}")


def test_partial_params_keep_the_deployment_config_and_bad_values_are_refused(stack, tiny_deployment):
    env = {**stack["env"], "PREFECT_HOME": os.environ["PREFECT_HOME"]}
    bad = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "loraflow-finetune/finetune-tiny",
                          "--params", json.dumps({"cfg": {"train": {"max_steps": -5}}})],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "cfg.train.max_steps" in bad.stdout + bad.stderr, bad.stdout + bad.stderr

    good = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "loraflow-finetune/finetune-tiny",
                           "--params", json.dumps({"cfg": {"train": {"max_steps": 2}}})],
                          env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    flow_run_id = next(w for w in good.stdout.split() if w.count("-") == 4 and len(w.strip("'\".,")) == 36).strip("'\".,")
    run = _wait_final(stack, flow_run_id)
    assert run.state.name == "Completed", run.state  # the tiny model, not the demo's: the override was partial
    result = _api(stack, lambda c: c.read_flow_run(flow_run_id))
    train_dirs = [p for p in (stack["home"] / "runs" / "train").iterdir() if (p / "manifest.json").is_file()]
    assert 2 in {json.loads((p / "train_metrics.json").read_text())["global_step"] for p in train_dirs}
    assert result.parameters["cfg"] == {"train": {"max_steps": 2}}


def test_basic_auth_server_refuses_clients_without_credentials(tmp_path):
    import urllib.error
    import urllib.request

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_API_AUTH_STRING": "admin:s3cret",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/flows/filter"

    def post(auth: str | None) -> int:
        request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
        if auth:
            import base64

            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.time() + 300
        while True:
            try:
                code = post("admin:s3cret")
                break
            except (urllib.error.URLError, OSError):
                assert server.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(1)
        assert code == 200
        assert post(None) == 401
        assert post("admin:wrong") == 401
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_a_promotion_is_approved_from_the_resume_form_in_the_ui(stack, tiny_llama_dir):
    """The retraining run suspends for approval; the flow run page's Resume form shows the champion-vs-challenger
    table; ticking Approve, naming the approver and submitting promotes the challenger with the answer recorded."""
    from selenium.webdriver.common.by import By

    from loraflow.ops.registry import Registry
    from test_live_retraining import _rows

    home = stack["home"] / "approval"
    folder = home / "incoming"
    folder.mkdir(parents=True)
    (folder / "batch-1.jsonl").write_text("".join(_rows(folder / "x", 48, 0)))
    cfg = tiny_config(home, folder, tiny_llama_dir, max_steps=4, save_steps=4)
    cfg = cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"require_approval": True}),
                                 "export": cfg.export.model_copy(update={"enabled": False})})
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{stack['port']}/api"}):
        remote = flow.from_source(source=str(REPO), entrypoint="flows/retrain.py:retrain")
        deployment_id = remote.deploy(name="retrain-approval", work_pool_name="loraflow",
                                      parameters={"cfg": cfg.model_dump(mode="json")}, print_next_steps=False)
    run = _api(stack, lambda c: c.create_flow_run_from_deployment(deployment_id))
    deadline = time.time() + 600
    while _api(stack, lambda c: c.read_flow_run(run.id)).state.name != "Suspended":
        state = _api(stack, lambda c: c.read_flow_run(run.id)).state
        assert not state.is_final() and time.time() < deadline, f"the run did not suspend: {state.name} {state.message}"
        time.sleep(2)
    base = f"http://127.0.0.1:{stack['port']}"
    browser = _browser()
    try:
        browser.get(f"{base}/runs/flow-run/{run.id}")
        resume = _wait_for(browser, lambda: next(b for b in browser.find_elements(By.TAG_NAME, "button")
                                                 if b.text.strip() == "Resume"), what="the Resume button")
        browser.execute_script("arguments[0].click()", resume)
        _wait_for(browser, lambda: "Resume Flow Run" in browser.page_source and "validation rougeL" in browser.page_source,
                  what="the resume form with the champion-vs-challenger table")
        toggle = browser.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        browser.execute_script("arguments[0].click()", toggle)
        approver, comment = browser.find_elements(By.TAG_NAME, "textarea")[:2]
        approver.send_keys("Chris")
        comment.send_keys("approved in the UI")
        browser.save_screenshot(str(SHOTS / "6-approval-form.png"))
        _submit(browser, lambda: next(b for b in browser.find_elements(By.TAG_NAME, "button")
                                      if b.text.strip() == "Submit"),
                lambda: _api(stack, lambda c: c.read_flow_run(run.id)).state.name != "Suspended",
                what="the run to resume")
        done = _wait_final(stack, run.id)
        assert done.state.name == "Completed", done.state
        browser.get(f"{base}/runs/flow-run/{run.id}")
        _wait_for(browser, lambda: "Completed" in browser.page_source, what="the completed run")
        browser.save_screenshot(str(SHOTS / "7-approved-run.png"))
    finally:
        browser.quit()
    champion = Registry(home / "runs" / "registry").champion()
    assert champion is not None and champion.approval.status == "approved"
    assert champion.approval.approver == "Chris" and champion.approval.comment == "approved in the UI"
