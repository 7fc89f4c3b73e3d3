"""The GPU check's steps, after scripts/gpu-check has installed the wheels: environment, GPU tests, benchmark.

    scripts/gpu-check OUT            # on the GPU machine (see that script)
    scripts/gpu-check OUT --dry-run  # here, on a CPU: the same steps, the GPU tests collected and skipped,
                                     # the benchmark on a tiny model (tests/test_gpu_check.py runs this)

Writes exactly two files into OUT: gpu-check.json (everything measured, the benchmark's report inside) and
gpu-check.log (every step's output). The tests and the benchmark run in their own processes with the packages
the GPU machine lacks made absent (`benchmarks/absent.py`), each under a time limit carved from the budget.
Exit status 0 when the tests passed (or, in the dry run, were collected) and the benchmark ran.
After a GPU run: `python -m benchmarks.gpu --markdown OUT/gpu-check.json` prints the docs' tables, and the
report's `benchmark.report` is what goes to benchmarks/results/gpu-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu_env import CARRY, REPO, WHEELS, carried, check, unmet_requirements, versions

STACK = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "pydantic",
         "tokenizers", "safetensors", "huggingface-hub", "pyarrow", "numpy", "trl", "liger-kernel", "pytest"]


class Log:
    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a")

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.fh.write(text + "\n")
        self.fh.flush()

    def run(self, cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int, float]:
        """Run `cmd` with its output into the log (and stdout); (exit status, seconds); 124 on timeout."""
        self.line(f"$ {' '.join(cmd)}   (limit {timeout:.0f} s)")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        code = None
        while code is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                self.line(f"... killed at its {timeout:.0f} s limit")
                return 124, time.perf_counter() - t0
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if line:
                    if "it/s]" not in line and "s/it]" not in line:  # progress bars: not worth a log line
                        self.line(line.rstrip("\n"))
                    continue
            code = proc.poll()
        for line in proc.stdout:
            self.line(line.rstrip("\n"))
        return code, time.perf_counter() - t0


def environment() -> dict:
    import torch

    out: dict = {"python": sys.version.split()[0], "versions": versions(STACK)}
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["torch_cuda"] = torch.version.cuda
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = None
    # what `pip install --no-deps` left unchecked: requirements of what was installed, against what is there
    out["unmet_requirements"] = unmet_requirements(CARRY)
    try:
        import bitsandbytes  # noqa: F401 - its native library loads on import

        out["bitsandbytes_import"] = "ok"
    except Exception as err:  # noqa: BLE001 - reported, not raised: the tests say what it breaks
        out["bitsandbytes_import"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return out


def junit(path: Path) -> dict:
    """Counts and one entry per test from pytest's JUnit XML."""
    if not path.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "cases": []}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed", "error": "errors"}.get(tag, tag), node.get("message")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": (message or "")[:500] or None})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped", "errors")}
    return {**counts, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 300)))
    p.add_argument("--started", type=float, default=None, help="epoch seconds the wrapper started (install time)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    started = a.started or time.time()
    log = Log(a.out / "gpu-check.log")
    left = lambda: a.budget_s - (time.time() - started)  # noqa: E731
    report: dict = {"dry_run": a.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "install_s": round(time.time() - started, 1) if a.started else None}
    wheels = check(WHEELS) if WHEELS.is_dir() else {"wheels": {}, "mb": 0, "problems": ["no .whl/ here"]}
    report["wheels"] = {**wheels, "pinned": carried()}
    report["environment"] = environment()
    log.line("environment: " + json.dumps(report["environment"]))
    cuda = report["environment"]["cuda_available"]
    if not cuda and not a.dry_run:
        log.line("error: no CUDA device visible to torch: this is the GPU check (use --dry-run on a CPU)")
        report["ok"] = False
        (a.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
        return 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        xml = Path(tmp) / "junit.xml"
        # the tests first (the point of the check), the benchmark in the time left
        test_limit = max(30.0, min(150.0, left() - 120))
        # `-o addopts=`: the everyday tier's `-n auto` needs pytest-xdist, which the GPU machine is not given
        code, seconds = log.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "benchmarks.absent", "-m", "gpu",
                                 "tests/gpu", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}"], test_limit, env)
        report["tests"] = {"exit": code, "seconds": round(seconds, 1), **junit(xml)}
        bench_limit = max(30.0, left() - 15)
        bench_out = Path(tmp) / "bench"
        cmd = [sys.executable, "-m", "benchmarks.absent", "benchmarks.gpu", "--out", str(bench_out),
               "--budget-s", str(max(20.0, bench_limit - 60))]
        code, seconds = log.run(cmd + (["--dry-run"] if a.dry_run else []), bench_limit, env)
        result = bench_out / "gpu-benchmark.json"
        report["benchmark"] = {"exit": code, "seconds": round(seconds, 1),
                               "report": json.loads(result.read_text()) if result.is_file() else None}
    tests = report["tests"]
    tests_ok = tests["exit"] == 0 and tests["failed"] == 0 and tests["errors"] == 0 and (
        tests["passed"] > 0 if cuda else tests["skipped"] > 0)
    report["ok"] = bool(tests_ok and report["benchmark"]["report"] is not None)
    report["seconds"] = round(time.time() - started, 1)
    (a.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    log.line(f"gpu-check: {'ok' if report['ok'] else 'FAILED'} in {report['seconds']} s; tests "
             f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped; "
             f"benchmark exit {report['benchmark']['exit']}; wrote {a.out / 'gpu-check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
