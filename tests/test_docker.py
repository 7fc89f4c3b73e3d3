"""The Docker image and compose stack (docker/, docs/docker.md): everything pinned, and pinned to what
pyproject.toml pins; a non-root GPU worker on a `process` pool; a server on postgres, reachable on loopback only.

The compose checks read `docker compose config --format json` (no engine needed). Where the docker
binary or its compose plugin is missing they read compose.yaml with the same `${VAR...}` interpolation,
so they still run; the test that needs compose itself skips, saying which part is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOC = REPO / "docs" / "docker.md"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
AUTH = "tester:not-a-real-password"  # the required LORAFLOW_AUTH_STRING, for `config`


# ---- Dockerfile parsing -------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#"):  # comments, also between continuation lines
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            word, _, args = line.partition(" ")
            out.append((word.upper(), args.strip()))
    return out


# Options whose next argument is not a package: a file, a URL, a path, a Python version.
_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "--constraints", "--overrides",
                  "--build-constraint", "--build-constraints", "-i", "--index-url", "--extra-index-url",
                  "-f", "--find-links", "-p", "--python", "-t", "--target", "--prefix", "--root",
                  "--cache-dir", "--src", "--install-dir", "--directory", "--project"}
# Options whose next argument is a package and must be pinned too.
_PACKAGE_OPTIONS = {"--with", "-w", "-e", "--editable"}


def _install_commands(run_args: str) -> list[tuple[str, list[str]]]:
    """("pip" | "apt", arguments after `install`) for each install command in a RUN line."""
    args = re.sub(r"^(--\S+\s+)+", "", run_args)  # RUN's own flags: --mount=..., --network=...
    if args.startswith("["):  # exec form
        args = shlex.join(json.loads(args))
    found = []
    for command in re.split(r"&&|\|\||[;|\n]", args):
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        for i, word in enumerate(words):
            if word != "install" or i == 0:
                continue
            before = " ".join(Path(w).name for w in words[max(0, i - 2):i])
            if re.search(r"(^|\s)(pip\d*(\.\d+)?|uv pip|uv tool|-m pip|pipx)$", before):
                found.append(("pip", words[i + 1:]))
            elif re.search(r"(^|\s)(apt-get|apt)$", before):
                found.append(("apt", words[i + 1:]))
    return found


def _pinned(kind: str, spec: str) -> bool:
    if kind == "apt":
        return "=" in spec
    if spec in (".", "..") or spec.startswith(("./", "../", "/")):
        return True  # the project itself, from the build context
    name, eq, version = spec.partition("==")
    return bool(eq and name and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version.split(";")[0].strip()))


def unpinned_installs(dockerfile_text: str) -> list[str]:
    """Every package a `pip install`/`uv pip install`/`uv tool install`/`apt-get install` names without
    an exact version (`==` for Python, `=` for apt). Requirement and constraint files pass: pin inside them."""
    bad = []
    for word, args in instructions(dockerfile_text):
        if word != "RUN":
            continue
        for kind, words in _install_commands(args):
            take_next_as_package = skip_next = False
            for w in words:
                if skip_next:
                    skip_next = False
                elif take_next_as_package:
                    take_next_as_package = False
                    if not _pinned(kind, w):
                        bad.append(w)
                elif w in _VALUE_OPTIONS:
                    skip_next = True
                elif w in _PACKAGE_OPTIONS:
                    take_next_as_package = True
                elif w.startswith("-"):
                    if w.startswith(("--with=", "--editable=")) and not _pinned(kind, w.split("=", 1)[1]):
                        bad.append(w.split("=", 1)[1])
                elif not _pinned(kind, w):
                    bad.append(w)
    return bad


def images(dockerfile_text: str) -> list[str]:
    """Every image the build pulls: FROM lines and COPY --from=<image>, not earlier stages' names."""
    stages: set[str] = set()
    found = []
    for word, args in instructions(dockerfile_text):
        words = [w for w in args.split() if not w.startswith("--platform")]
        if word == "FROM":
            if words[0] not in stages:
                found.append(words[0])
            if len(words) == 3 and words[1].lower() == "as":
                stages.add(words[2])
        elif word == "COPY":
            for w in words:
                if w.startswith("--from="):
                    source = w.split("=", 1)[1]
                    if source not in stages and not source.isdigit():
                        found.append(source)
    return found


def image_pinned(image: str) -> bool:
    """A tag that is not `latest` (or a digest), and no build ARG that could change it."""
    if "$" in image:
        return False
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.split(":", 1)[1] not in ("", "latest")


def env(dockerfile_text: str) -> dict[str, str]:
    """The ENV the image ends with (KEY=value pairs; `ENV KEY value` too)."""
    out: dict[str, str] = {}
    for word, args in instructions(dockerfile_text):
        if word == "ENV":
            words = shlex.split(args)
            if "=" not in words[0]:
                out[words[0]] = " ".join(words[1:])
            else:
                out.update(w.split("=", 1) for w in words)
    return out


def command(dockerfile_text: str) -> str:
    """The final ENTRYPOINT + CMD, as one shell string."""
    parts = {}
    for word, args in instructions(dockerfile_text):
        if word in ("CMD", "ENTRYPOINT"):
            parts[word] = shlex.join(json.loads(args)) if args.startswith("[") else args
    return " ".join(parts[k] for k in ("ENTRYPOINT", "CMD") if k in parts)


# ---- pyproject pins --------------------------------------------------------------------------------


def pins() -> dict[str, str]:
    """name -> exact version from [tool.uv] constraint-dependencies."""
    out = {}
    for spec in PYPROJECT["tool"]["uv"]["constraint-dependencies"]:
        name, _, version = spec.partition("==")
        out[name.strip().lower()] = version.strip()
    return out


# ---- Dockerfile checks -----------------------------------------------------------------------------

BAD_SNIPPET = """\
FROM python
FROM ubuntu:latest AS base
COPY --from=ghcr.io/astral-sh/uv /uv /bin/
FROM base
RUN pip install requests
RUN apt-get update && apt-get install -y curl git=1:2.39.5-0+deb12u1 \\
 && python -m pip install --no-cache-dir "torch==2.15.0" 'numpy>=2' \\
 && uv pip install --system -r requirements.txt -c constraints.txt prefect
RUN uv tool install --with rich ruff==0.6.0 && uv pip install -e . transformers==5.24.0
"""


def test_unpinned_installs_finds_every_unpinned_package():
    assert unpinned_installs(BAD_SNIPPET) == ["requests", "curl", "numpy>=2", "prefect", "rich"]
    assert unpinned_installs("RUN pip install uv==0.13.9 && uv pip install --system . -r req.txt") == []
    assert unpinned_installs('RUN ["pip", "install", "requests"]') == ["requests"]
    assert unpinned_installs("RUN --mount=type=cache,target=/root/.cache pip3 install requests==2.*") == [
        "requests==2.*"]


def test_images_and_pins_on_a_bad_snippet():
    assert images(BAD_SNIPPET) == ["python", "ubuntu:latest", "ghcr.io/astral-sh/uv"]
    assert not any(image_pinned(i) for i in images(BAD_SNIPPET))
    assert image_pinned("localhost:5000/cuda:13.0.0") and not image_pinned("localhost:5000/cuda")
    assert image_pinned("nvidia/cuda@sha256:" + "0" * 64) and not image_pinned("nvidia/cuda:${CUDA}")


def test_the_dockerfile_installs_nothing_unpinned():
    text = DOCKERFILE.read_text()
    assert unpinned_installs(text) == []
    assert unpinned_installs(text + "RUN pip install requests\n") == ["requests"]
    assert not re.search(r"https?://", text), "the image downloads nothing by URL: packages come through uv"


def test_every_image_the_build_pulls_has_a_pinned_tag():
    found = images(DOCKERFILE.read_text())
    assert found and [i for i in found if not image_pinned(i)] == []
    assert any(i.startswith("nvidia/cuda:") and "runtime" in i for i in found), found


def test_the_project_is_installed_from_pyproject_without_a_lock_file():
    text = DOCKERFILE.read_text()
    runs = " ".join(args for word, args in instructions(text) if word == "RUN")
    assert "uv sync --no-dev" in runs
    # uv.lock is git-ignored, so a clean clone has none: --frozen/--locked would fail there.
    assert "--frozen" not in runs and "--locked" not in runs
    for word, args in instructions(text):
        if word in ("COPY", "ADD") and "--from=" not in args:
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert source not in ("uv.lock", ".venv", "."), f"{word} {args}: copy only tracked sources"
                assert (REPO / source).exists(), f"{word} {args}: {source} is not in the repo"


def test_python_is_pinned_and_allowed_by_pyproject():
    python = env(DOCKERFILE.read_text())["UV_PYTHON"]
    assert re.fullmatch(r"3\.\d+\.\d+", python), python
    minor = tuple(int(x) for x in python.split(".")[:2])
    assert (3, 11) <= minor < (3, 13), f"requires-python is {PYPROJECT['project']['requires-python']}"


def test_the_image_runs_as_a_non_root_user():
    users = [args.split(":")[0] for word, args in instructions(DOCKERFILE.read_text()) if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users


def test_the_default_command_starts_a_process_worker_on_a_configurable_pool():
    text = DOCKERFILE.read_text()
    cmd = command(text)
    assert "prefect worker start" in cmd and "--type process" in cmd, cmd
    assert '--pool "$LORAFLOW_WORK_POOL"' in cmd or "--pool $LORAFLOW_WORK_POOL" in cmd, cmd
    variables = env(text)
    assert variables["LORAFLOW_WORK_POOL"] == "loraflow"
    assert variables["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert variables["HF_HOME"].startswith("/shared/") and variables["LORAFLOW_CACHE"].startswith("/shared/")
    assert "PREFECT_API_URL" not in variables, "the API URL is the deployer's to set, not the image's"


# ---- compose -----------------------------------------------------------------------------------


def _interpolate(value, environ: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$."""
    if isinstance(value, dict):
        return {k: _interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name") or m.group("bare"), m.group("op"), m.group("arg")
        current = environ.get(name)
        missing = current is None or (current == "" and op and op.startswith(":"))
        if op and op.endswith("?") and missing:
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return (arg if op and missing else current) or ""

    pattern = r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
    return re.sub(pattern, sub, value)


def _compose_available() -> str | None:
    """None if `docker compose` works, else why not."""
    if shutil.which("docker") is None:
        return "the docker binary is not on PATH"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else "docker has no compose plugin (" + (probe.stderr.strip().splitlines() or ["?"])[0] + ")"


def _docker_compose_config(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LORAFLOW_AUTH_STRING", "POSTGRES_PASSWORD")}
    return subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                          env={**environ, **extra_env}, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The resolved compose model, from docker compose itself where it is installed."""
    if _compose_available() is None:
        done = _docker_compose_config({"LORAFLOW_AUTH_STRING": AUTH})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    environ = {k: v for k, v in os.environ.items() if k not in ("LORAFLOW_AUTH_STRING", "POSTGRES_PASSWORD")}
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), {**environ, "LORAFLOW_AUTH_STRING": AUTH})


def test_compose_file_is_valid_and_requires_the_auth_string():
    why = _compose_available()
    if why:
        pytest.skip(f"`docker compose config` cannot run: {why}")
    assert _docker_compose_config({"LORAFLOW_AUTH_STRING": AUTH}).returncode == 0
    missing = _docker_compose_config({})
    assert missing.returncode != 0 and "LORAFLOW_AUTH_STRING" in missing.stderr, missing.stderr


def test_interpolation_matches_compose_rules():
    environ = {"SET": "x", "EMPTY": ""}
    assert _interpolate("${SET:-d}/${EMPTY:-d}/${EMPTY-d}/${UNSET-d}/$SET/$$SET", environ) == "x/d//d/x/$SET"
    with pytest.raises(ValueError, match="UNSET is missing a value: say so"):
        _interpolate({"a": ["${UNSET:?say so}"]}, environ)


def test_the_stack_has_postgres_a_server_and_a_worker(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "worker"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert image_pinned(service["image"]), f"{name}: {service['image']}"


def test_the_server_uses_postgres_with_basic_auth(compose):
    server = compose["services"]["prefect-server"]
    assert server["command"][:4] == ["prefect", "server", "start", "--host"] and "0.0.0.0" in server["command"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(r"postgresql\+asyncpg://prefect:[^@]+@postgres:5432/prefect", url), url
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == AUTH
    postgres = compose["services"]["postgres"]["environment"]
    assert url.split("://prefect:")[1].split("@")[0] == postgres["POSTGRES_PASSWORD"]


def test_no_other_web_page_can_drive_the_stacks_api(compose):
    """CSRF tokens required, and cross-origin calls only from the UI's own origin (Prefect's defaults: off, and *)."""
    env = compose["services"]["prefect-server"]["environment"]
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4200,http://localhost:4200"


def test_the_server_port_is_published_on_loopback_only(compose):
    ports = compose["services"]["prefect-server"]["ports"]
    assert [(p["host_ip"], int(p["target"]), str(p["published"])) for p in ports] == [("127.0.0.1", 4200, "4200")]
    for name, service in compose["services"].items():
        if name != "prefect-server":
            assert not service.get("ports"), f"{name} publishes ports"


def test_the_worker_gets_a_gpu_the_api_and_the_shared_volume(compose):
    worker = compose["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(COMPOSE.parent, worker["build"]["context"]).resolve() == REPO
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], int(d["count"]), d["capabilities"]) for d in devices] == [("nvidia", 1, ["gpu"])]
    environment = worker["environment"]
    assert environment["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert environment["PREFECT_API_AUTH_STRING"] == AUTH
    mounts = [(v["type"], v["source"], v["target"]) for v in worker["volumes"]]
    assert ("volume", "loraflow-shared", "/shared") in mounts
    assert {"loraflow-shared", "postgres-data"} <= set(compose["volumes"])


def test_prefect_and_python_versions_agree_with_pyproject(compose):
    prefect = pins()["prefect"]
    server_image = compose["services"]["prefect-server"]["image"]
    match = re.fullmatch(r"prefecthq/prefect:(?P<version>[^-]+)-python(?P<python>3\.\d+)", server_image)
    assert match, server_image
    assert match["version"] == prefect, f"server image {server_image} vs pyproject prefect=={prefect}"
    dockerfile = DOCKERFILE.read_text()
    assert env(dockerfile)["UV_PYTHON"].startswith(match["python"] + "."), "server and worker Pythons differ"
    # Any prefect the Dockerfile names by version must be the same one.
    for version in re.findall(r"prefect(?:==|:)([0-9][^\s\"'-]*)", dockerfile):
        assert version == prefect
    assert compose["services"]["worker"]["image"] == f"loraflow:{PYPROJECT['project']['version']}"


def test_the_doc_names_every_variable_the_stack_reads():
    doc = DOC.read_text()
    variables = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text())) | {"LORAFLOW_WORK_POOL", "HF_HOME",
                                                                      "LORAFLOW_CACHE"}
    assert {v for v in variables if v not in doc} == set()
    assert "docker compose -f docker/compose.yaml up" in doc and "NVIDIA Container Toolkit" in doc
