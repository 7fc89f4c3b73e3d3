"""The import rules (pyproject.toml's `[tool.importlinter]`, run by `uv run lint-imports` and .ci/run): they
hold, they cover every module, and a violation fails them; plus the one rule import-linter cannot see: no
module imports another module's underscore names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("loraflow", "flows", "tasks")


def lint_imports(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=cwd, text=True,
                          capture_output=True, timeout=300, env={"PATH": "/usr/bin:/bin", **env})


def modules() -> list[str]:
    """Every module of the three packages, as dotted names (packages by their __init__)."""
    out = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if not (path.parent / "__init__.py").exists():  # loraflow/metrics/rouge: evaluate's metric script
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_import_contracts_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_module_has_a_layer():
    """A module left out of the layers contract would be free to import anything: each one is named, or sits
    in a package that is."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    unplaced = [m for m in modules() if m not in ("loraflow",) and not any(m == n or m.startswith(n + ".")
                                                                           for n in named)]
    assert not unplaced, f"add these to a layer in pyproject.toml's [tool.importlinter]: {unplaced}"


@pytest.mark.parametrize("module, line, says", [
    ("loraflow/store/__init__.py", "from flows import pipeline", ["loraflow.store is not allowed to import flows",
                                                                  "loraflow.store -> flows.pipeline"]),
    ("loraflow/stages/data.py", "from loraflow.store import data_key",
     ["a stage builds into the folder it is given: it never imports the store's keys", "BROKEN",
      "loraflow.stages.data is not allowed to import loraflow.store"]),
], ids=["store imports a flow", "a stage imports a key"])
def test_an_import_against_the_rules_fails_the_check(tmp_path, module, line, says):
    """A low layer importing a higher one, or a stage importing the store's keys: lint-imports names the import
    and exits non-zero."""
    for name in (*PACKAGES, "pyproject.toml"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\n{line}  # noqa: E402\n")
    done = lint_imports(tmp_path, PYTHONPATH=str(tmp_path))
    assert done.returncode == 1, done.stdout[-3000:]
    for text in says:
        assert text in " ".join(done.stdout.split()), done.stdout[-3000:]


def test_no_module_imports_another_modules_underscore_names():
    """`from loraflow.stages.data import _local_files` couples two modules through a name that says "mine only":
    such a name becomes public (no underscore) the day another module needs it."""
    found = []
    for name in modules():
        path = REPO / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
