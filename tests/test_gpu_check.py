"""scripts/gpu-check, tested here without a GPU: its --dry-run end to end, and the wheels it carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu_env import BLOCKED, CARRY, CUDA_LIBRARY, carried, check, pins, trim_bitsandbytes

REPO = Path(__file__).resolve().parents[1]


def gpu_check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "gpu-check"), str(out), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = gpu_check(out, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "gpu-check.json").read_text())


def test_the_dry_run_writes_one_json_and_one_log(dry_run):
    out, report = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log"]
    assert report["ok"] is True and report["dry_run"] is True
    log = (out / "gpu-check.log").read_text()
    assert "-m gpu tests/gpu" in log and "benchmarks.gpu" in log and "gpu-check: ok" in log
    assert report["wheels"]["pinned"] == carried()
    assert report["environment"]["versions"]["torch"] and report["environment"]["cuda_available"] is False


def test_the_dry_run_collects_every_gpu_test_and_skips_it_without_cuda(dry_run):
    tests = dry_run[1]["tests"]
    names = {c["test"].rsplit("::", 1)[-1] for c in tests["cases"]}
    assert {"test_training_in_the_worker_takes_the_cuda_path_and_learns",
            "test_a_single_rank_nccl_group_sums_and_gathers"} <= names
    assert tests["skipped"] == len(tests["cases"]) >= 9 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert all("needs a CUDA device" in c["message"] for c in tests["cases"])


def test_the_dry_run_benchmark_measures_every_side_without_the_absent_packages(dry_run):
    bench = dry_run[1]["benchmark"]
    assert bench["exit"] == 0
    report = bench["report"]
    assert report["absent_packages"] == BLOCKED  # prefect & co. were absent in the benchmark's process
    sides = report["models"]["tiny"]["sides"]
    for side in ("baseline", "trl", "loraflow", "logits everywhere", "packed", "random batches"):
        r = sides[side]
        assert r["examples_per_second"] > 0 and r["label_tokens_per_second"] > 0 and r["timed_steps"] == 2, (side, r)
        assert r["speed_vs_baseline"] > 0 and r["last_loss"] > 0
    assert sides["loraflow"]["label_only_logits"] and not sides["baseline"]["label_only_logits"]
    # the same examples, so the same label tokens on every side (counted, not divided from two rounded rates: those
    # read 2.9 and 3.0 for the same examples on a slow CPU)
    timed = {s: (r["timed_examples"], r["timed_label_tokens"]) for s, r in sides.items() if "examples_per_second" in r}
    assert len(set(timed.values())) == 1, timed
    assert "skipped" in sides["liger fused linear CE"] or "error" in sides["liger fused linear CE"]  # no triton GPU
    gen = report["models"]["tiny"]["generation"]
    assert gen["all_full_length"] and gen["loraflow_batched_examples_per_second"] > 0


def test_without_wheels_the_gpu_run_stops_with_the_fix(tmp_path):
    done = gpu_check(tmp_path / "out", GPU_CHECK_WHEELS=str(tmp_path / "none"))
    assert done.returncode == 2
    assert "run scripts/gpu-wheels where the registry is reachable, and carry .whl" in done.stderr
    assert not (tmp_path / "out" / "gpu-check.json").exists()


def _wheel(folder: Path, name: str, version: str, files: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f in files:
            z.writestr(f, b"x")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "".join(f"{f},sha256=x,1\n" for f in files))
    return path


def test_bitsandbytes_is_trimmed_to_the_cuda_13_library_and_the_wheels_checked_against_the_pins(tmp_path):
    libs = [f"bitsandbytes/libbitsandbytes_{v}.so" for v in ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72")]
    versions = carried()
    for name in CARRY:
        files = ["bitsandbytes/__init__.py", *libs] if name == "bitsandbytes" else [f"{name}/__init__.py"]
        _wheel(tmp_path, name, versions[name], files)
    untrimmed = check(tmp_path)["problems"]
    assert len(untrimmed) == 1 and "scripts/gpu-wheels" in untrimmed[0]
    wheel = next(tmp_path.glob("bitsandbytes-*.whl"))
    trim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as z:
        kept = sorted(n for n in z.namelist() if n.endswith(".so"))
        record = z.read(f"bitsandbytes-{versions['bitsandbytes']}.dist-info/RECORD").decode()
    assert kept == ["bitsandbytes/libbitsandbytes_cpu.so", f"bitsandbytes/{CUDA_LIBRARY}"]
    assert "cuda118" not in record and CUDA_LIBRARY in record and "__init__.py" in record
    assert check(tmp_path)["problems"] == []
    _wheel(tmp_path, "peft", "0.1.0", ["peft/__init__.py"])  # a second version of one package
    assert check(tmp_path)["problems"] == [f"peft: want {versions['peft']}, found ['0.1.0', '{versions['peft']}']"]
    assert set(CARRY) <= set(pins())  # every carried package is pinned in pyproject.toml
