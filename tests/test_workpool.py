"""deployments/k8s-gpu-job-template.json: the base job template of the `loraflow-k8s` Kubernetes work pool.

No cluster is needed. A real Prefect server (the test harness) takes the template through the same
`prefect work-pool create ... --type kubernetes --base-job-template ...` a user types, keeps it whole, and
deploys k8s.yaml's `finetune-k8s` on it. The template is then rendered the way a worker renders it
(Prefect's `BaseJobConfiguration.from_template_and_values`, then `prepare_for_flow_run`), and the Job
must ask for the GPUs, mount the shared volume, load the Secret and carry the PREFECT_API_URL asked for.
The server's refusals are checked too: an undeclared variable, a default of the wrong type, job
variables that do not fit the schema. (The Kubernetes worker, prefect-kubernetes, then turns `env` into
the container's env list; tests/ does not install it.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_FILE = REPO / "deployments" / "k8s-gpu-job-template.json"
K8S_YAML = REPO / "deployments" / "k8s.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOC = REPO / "docs" / "kubernetes.md"
POOL = "loraflow-k8s"
CREATE = f"prefect work-pool create {POOL} --type kubernetes --base-job-template deployments/k8s-gpu-job-template.json"
API_IN_CLUSTER = "http://prefect-server.prefect.svc.cluster.local:4200/api"


def template() -> dict[str, Any]:
    return json.loads(TEMPLATE_FILE.read_text())


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    [job_container] = manifest["spec"]["template"]["spec"]["containers"]
    return job_container


def prefects_default() -> dict[str, Any]:
    """The Kubernetes worker's default base job template, as this Prefect's server bundles it."""
    [prefect_dir] = importlib.util.find_spec("prefect").submodule_search_locations
    views = Path(prefect_dir) / "server" / "api" / "collections_data" / "views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    return metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def fixed_values(node: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a template that is not a `{{ placeholder }}`, by its path."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in fixed_values(value, f"{path}/{key}").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in fixed_values(value, f"{path}/{i}").items()}
    return {} if isinstance(node, str) and "{{" in node else {path: node}


# ---- the file alone -----------------------------------------------------------------------------


def test_template_keeps_the_shape_of_prefects_kubernetes_template():
    ours, default = template(), prefects_default()
    assert set(ours) == {"job_configuration", "variables"}
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    # The worker fills these in per flow run.
    config = ours["job_configuration"]
    assert (config["command"], config["labels"], config["name"]) == ("{{ command }}", "{{ labels }}", "{{ name }}")
    manifest = config["job_manifest"]
    assert manifest["metadata"]["generateName"] == "{{ name }}-"
    assert container(manifest)["env"] == "{{ env }}"
    assert container(manifest)["args"] == "{{ command }}"
    # Prefect's fixed values stay (prefect-kubernetes refuses a Job without parallelism/completions: 1 in
    # the pod spec, and backoffLimit 0 makes it reschedule a run whose pod was evicted).
    ours_fixed = fixed_values(manifest)
    for path, value in fixed_values(default["job_configuration"]["job_manifest"]).items():
        assert ours_fixed.get(path) == value, path


def test_template_matches_the_image_it_runs():
    """The pod runs as the image's user, and everything the image keeps under /shared lands on the volume."""
    dockerfile = DOCKERFILE.read_text()
    uid = int(re.search(r"useradd\b[^\n]*--uid (\d+)", dockerfile).group(1))
    manifest = template()["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    assert {pod["securityContext"][k] for k in ("runAsUser", "fsGroup")} == {uid}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(manifest)["volumeMounts"]}
    assert volumes["shared"]["persistentVolumeClaim"] == {"claimName": "{{ shared_pvc }}"}
    for variable in ("HF_HOME", "LORAFLOW_CACHE", "PREFECT_LOCAL_STORAGE_PATH"):
        path = re.search(rf"\b{variable}=(\S+)", dockerfile).group(1)
        assert path.startswith(mounts["shared"] + "/"), f"{variable}={path} is not on the shared volume"
    assert "LORAFLOW_PROJECT_DIR=/app" in dockerfile  # where k8s.yaml's pull step finds the flows
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert template()["variables"]["properties"]["image"]["default"] == f"loraflow:{version}"


def test_commands_in_k8s_yaml_and_the_doc_name_this_template():
    local = {d["name"]: d for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]}
    k8s = {d["name"]: d for d in yaml.safe_load(K8S_YAML.read_text())["deployments"]}["finetune-k8s"]
    assert k8s["entrypoint"] == local["finetune"]["entrypoint"] == "flows/finetune.py:finetune"
    assert all(d["work_pool"]["name"] != POOL for d in local.values())  # `deploy --all` there needs no k8s pool
    assert k8s["work_pool"]["name"] == POOL
    assert set(k8s["work_pool"]["job_variables"]) <= set(template()["variables"]["properties"])
    for text in (K8S_YAML.read_text(), DOC.read_text()):
        assert CREATE in text


# ---- a real Prefect server ----------------------------------------------------------------------


def _cli(*args: str, home: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """The `prefect` command line, as a user runs it, against the harness server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(home), **env_vars}
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)


def _api(call):
    """Run `await call(client)` with a client of the harness server."""
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await call(client)

    return anyio.run(run)


@pytest.fixture(scope="module")
def k8s_pool(prefect_harness, tmp_path_factory):
    """The pool, created with the command the docs give, and read back through the client."""
    home = tmp_path_factory.mktemp("prefect-home")
    done = _cli(*CREATE.split()[1:], home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    return _api(lambda client: client.read_work_pool(POOL)), home


def test_server_keeps_the_template_whole(k8s_pool):
    pool, _ = k8s_pool
    assert pool.type == "kubernetes"
    assert pool.base_job_template == template()
    config = pool.base_job_template["job_configuration"]
    limits = container(config["job_manifest"])["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert config["env"]["PREFECT_API_URL"] == "{{ prefect_api_url }}"
    assert container(config["job_manifest"])["envFrom"] == [{"secretRef": {"name": "{{ env_secret }}"}}]


def _render(base_job_template: dict[str, Any], values: dict[str, Any]):
    """The job configuration a worker builds for one flow run of a deployment with these job variables."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesJob(BaseJobConfiguration):
        """The fields the Kubernetes worker adds to Prefect's base configuration."""

        namespace: str = "default"
        job_manifest: dict[str, Any]

    config = anyio.run(KubernetesJob.from_template_and_values, base_job_template, values)
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4()))
    return config


def test_rendered_job_asks_for_gpus_storage_and_the_api(k8s_pool):
    from prefect.settings import PREFECT_API_URL

    pool, _ = k8s_pool
    worker_api_url = PREFECT_API_URL.value()  # the harness server's: what a worker would pass on
    assert worker_api_url != API_IN_CLUSTER
    config = _render(pool.base_job_template, {
        "gpu_count": 2, "prefect_api_url": API_IN_CLUSTER, "env_secret": "team-s3", "shared_pvc": "team-nfs",
        "namespace": "ml", "image": "team/loraflow:0.1.0", "node_selector": {"gpu": "h100"},
        "env": {"TOKENIZERS_PARALLELISM": "false"},
    })
    assert config.namespace == "ml"
    assert config.env["PREFECT_API_URL"] == API_IN_CLUSTER  # over the worker's own
    assert config.env["TOKENIZERS_PARALLELISM"] == "false"  # a deployment's env is merged in
    assert config.env["PREFECT__FLOW_RUN_ID"]
    job = config.job_manifest
    assert job["metadata"]["namespace"] == "ml"
    assert config.name == "brave-otter"  # prefect-kubernetes names the Job after it (generateName)
    pod = job["spec"]["template"]["spec"]
    main = container(job)
    assert main["image"] == "team/loraflow:0.1.0"
    assert main["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert main["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert main["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    assert config.command == "prefect flow-run execute"  # prefect-kubernetes puts it in the container's args
    assert {"name": "shared", "mountPath": "/shared"} in main["volumeMounts"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "team-nfs"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert "serviceAccountName" not in pod and "imagePullSecrets" not in pod  # unset: left out, not empty


def test_rendered_job_defaults(k8s_pool):
    """Only the pool's defaults: one GPU, the loraflow image, the worker's own API URL."""
    from prefect.settings import PREFECT_API_URL

    pool, _ = k8s_pool
    config = _render(pool.base_job_template, {})
    main = container(config.job_manifest)
    assert config.namespace == config.job_manifest["metadata"]["namespace"] == "loraflow"
    assert main["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert main["image"] == template()["variables"]["properties"]["image"]["default"]
    assert main["envFrom"] == [{"secretRef": {"name": "loraflow-env"}}]
    assert config.env["PREFECT_API_URL"] == PREFECT_API_URL.value()
    assert config.job_manifest["spec"]["ttlSecondsAfterFinished"] == 86400


def test_k8s_yaml_deploys_finetune_k8s_onto_the_pool(k8s_pool):
    pool, home = k8s_pool
    done = _cli("--no-prompt", "deploy", "--prefect-file", str(K8S_YAML), "--name", "finetune-k8s", home=home,
                LORAFLOW_PROJECT_DIR="/home/someone/loraflow")
    assert done.returncode == 0, done.stdout + done.stderr
    deployment = _api(lambda client: client.read_deployment_by_name("loraflow-finetune/finetune-k8s"))
    assert deployment.work_pool_name == POOL
    # The pod resolves the pull step's folder from its own environment (the image's /app), not the deployer's.
    assert "{{ LORAFLOW_PROJECT_DIR }}" in json.dumps(deployment.pull_steps)
    assert deployment.job_variables == {"image": "loraflow:0.1.0", "gpu_count": 1}
    assert deployment.parameters["cfg"]["run"]["output_dir"] == "/shared/runs"
    config = _render(pool.base_job_template, deployment.job_variables)
    assert container(config.job_manifest)["resources"]["limits"] == {"nvidia.com/gpu": 1}


def test_server_refuses_job_variables_that_do_not_fit(k8s_pool):
    from prefect.exceptions import PrefectHTTPStatusError

    async def deploy(client, job_variables):
        flow_id = await client.create_flow_from_name("loraflow-workpool-probe")
        return await client.create_deployment(flow_id=flow_id, name="probe", work_pool_name=POOL,
                                              job_variables=job_variables)

    with pytest.raises(PrefectHTTPStatusError, match="field 'gpu_count'. Failure reason: 'two' is not valid"):
        _api(lambda client: deploy(client, {"gpu_count": "two"}))
    with pytest.raises(PrefectHTTPStatusError, match="field 'gpu_count'. Failure reason: 0 is less than the minimum of 1"):
        _api(lambda client: deploy(client, {"gpu_count": 0}))
    assert _api(lambda client: deploy(client, {"gpu_count": 4}))  # the same call, with a valid value


def test_server_refuses_broken_templates(k8s_pool):
    """What `prefect work-pool create` sends, refused: an undeclared variable, a default of the wrong type."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    def create(name, base_job_template):
        pool = WorkPoolCreate(name=name, type="kubernetes", base_job_template=base_job_template)
        return _api(lambda client: client.create_work_pool(pool))

    undeclared = template()
    container(undeclared["job_configuration"]["job_manifest"])["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    with pytest.raises(PrefectHTTPStatusError, match=r"undeclared variable\(s\): gpus"):
        create("undeclared-k8s", undeclared)

    mistyped = template()
    mistyped["variables"]["properties"]["gpu_count"]["default"] = "one"
    with pytest.raises(PrefectHTTPStatusError, match="defaults: Validation failed for field 'gpu_count'"):
        create("mistyped-k8s", mistyped)

    assert create("same-k8s", template()).base_job_template == template()  # the same call, unbroken
