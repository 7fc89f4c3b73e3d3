"""What this machine computes fast, decided by a fixed rule and without importing torch.

`quantization.compute_dtype: auto` is resolved here, once, before any cache key is made, so the key
holds the dtype that shapes the numbers ('bfloat16' or 'float32'), never 'auto':
- with a CUDA GPU: bf16 when the GPU supports it (compute capability 8.0+: Ampere and later), else fp32;
- on a CPU: bf16 when the CPU has native bf16 matmul instructions (the `avx512_bf16` or `amx_bf16`
  flags: AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+), else fp32. Without them bf16 is emulated
  and ~2.5x slower than fp32; with them bf16 matmuls run ~4x faster than fp32 (docs/benchmarks.md).
No timing takes part in the choice (a timing would make cache keys differ between runs of one machine);
`matmul_peaks` measures both dtypes for the log and the benchmarks only.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraflow.config import PipelineConfig

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# Tests and benchmarks set this to stand in for another CPU (space-separated flags; empty = none).
FLAGS_ENV = "LORAFLOW_CPU_FLAGS"
# oneDNN (torch's CPU kernels for bf16 matmuls) keeps every kernel it builds for a new shape, in two caches of
# 1024 entries each (oneDNN's primitive cache, and ideep's above it), at about 1 MB an entry. Batches padded to
# their longest example have a new shape at almost every step, so a CPU training process grew by ~12 MB a step
# (docs/benchmarks.md, "the heap over a long run"). A step reuses its shape's kernels across the layers; 128
# entries hold a few steps' worth and cost no speed measured. The training process gets these unless the user's
# environment sets them (`launch._child_env`); both caches read them when first used.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), or LORAFLOW_CPU_FLAGS when set."""
    forced = os.environ.get(FLAGS_ENV)
    if forced is not None:
        return frozenset(forced.split())
    return frozenset(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


@lru_cache(maxsize=None)
def _cuda_bf16() -> bool:
    """Every visible GPU has compute capability >= 8.0 (nvidia-smi; torch only if it cannot tell)."""
    if shutil.which("nvidia-smi") is not None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            caps = [float(line) for line in out.split() if line.replace(".", "", 1).isdigit()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible and all(d.strip().isdigit() for d in visible.split(",")):
                caps = [caps[int(d)] for d in visible.split(",") if int(d) < len(caps)]
            if caps:
                return min(caps) >= 8.0
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    import torch  # a GPU that nvidia-smi cannot describe: ask CUDA itself

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_compute_dtype(name: str) -> str:
    """'auto' -> 'bfloat16' or 'float32' by the rule above; any other name is returned as given."""
    if name != "auto":
        return name
    if visible_gpu_count() > 0:
        return "bfloat16" if _cuda_bf16() else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def resolve_mixed_precision(bf16: bool | str, compute_dtype: str) -> bool:
    """`train.bf16` resolved: 'auto' = bf16 autocast when the compute dtype (resolved) is bfloat16, on a GPU and on
    a CPU alike. The LoRA weights and AdamW stay fp32; the LoRA matmuls and their gradients run in bf16 like the
    frozen base's (docs/benchmarks.md, "Each lever alone": the autocast row)."""
    if bf16 != "auto":
        return bool(bf16)
    return resolve_compute_dtype(compute_dtype) == "bfloat16"


def resolve_quantization(quant):
    """A `QuantizationConfig` with `compute_dtype: auto` replaced by the dtype it means here (for keys)."""
    return quant.model_copy(update={"compute_dtype": resolve_compute_dtype(quant.compute_dtype)})


def why_dtype(name: str) -> str:
    """One line saying which rule chose the compute dtype, for the log."""
    resolved = resolve_compute_dtype(name)
    if name != "auto":
        return f"compute dtype {resolved} (set in the config)"
    if visible_gpu_count() > 0:
        return f"compute dtype {resolved} (auto: CUDA GPU {'with' if resolved == 'bfloat16' else 'without'} bf16)"
    have = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
    reason = f"CPU has {', '.join(have)}" if have else f"CPU has none of {', '.join(BF16_CPU_FLAGS)}"
    return f"compute dtype {resolved} (auto: {reason})"


def matmul_peaks(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of a size x size matmul in fp32 and bf16 on this process's device.
    Information only: nothing chooses by it."""
    import time

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{str(dtype).removeprefix('torch.')}_gflops"] = round(2 * size**3 / best / 1e9, 1)
    return out


def machine() -> dict[str, object]:
    """The facts a speed number depends on: CPU, the flags that matter, threads, torch build, GPUs."""
    import torch

    flags = cpu_flags()
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_flags": {flag: flag in flags for flag in REPORTED_FLAGS},
        "cpu_flags_forced": os.environ.get(FLAGS_ENV) is not None,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "compute_dtype_auto": resolve_compute_dtype("auto"),
        "bf16_autocast_auto": resolve_mixed_precision("auto", "auto"),
    }
    return info


def visible_gpu_count() -> int:
    """GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def resolve_processes(value: int | str) -> int:
    """'auto' = one process per visible GPU (1 without a GPU); a number is kept as given."""
    return max(1, visible_gpu_count()) if value == "auto" else int(value)


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with the machine-dependent 'auto' settings replaced by what they mean here, in one place, before any
    cache key is made and before any stage runs: the compute dtype (`resolve_quantization`), the export dtype
    (the compute dtype the model was trained and scored in), bf16 autocast in training (`resolve_mixed_precision`)
    and the number of training processes (`resolve_processes`). 'auto' and what it stands for are then one setting: one key, one folder.
    `gradient_checkpointing: auto` is decided when training starts (`loraflow.stages.train.stage`), from the
    memory free then. Idempotent."""
    quant = resolve_quantization(cfg.quantization)
    train = cfg.train.model_copy(update={"num_processes": resolve_processes(cfg.train.num_processes),
                                         "bf16": resolve_mixed_precision(cfg.train.bf16, quant.compute_dtype)})
    export = cfg.export.model_copy(update={"dtype": quant.compute_dtype if cfg.export.dtype == "auto" else cfg.export.dtype})
    return cfg.model_copy(update={"quantization": quant, "train": train, "export": export})


def local_rank() -> int | None:
    """This process's rank on the machine under torchrun (LOCAL_RANK: its GPU), None in a single process."""
    value = os.environ.get("LOCAL_RANK")
    return None if value is None else int(value)


def return_freed_memory() -> bool:
    """Hand the memory Python and torch have freed back to the OS (glibc's `malloc_trim`), so the process's RSS
    shrinks to what it holds. glibc keeps freed heap blocks for reuse: after a 4-bit model is loaded and its
    full-precision weights dropped, ~0.4-0.5 GB stays resident otherwise (benchmarks/memory.py). False where
    there is no glibc (nothing to do)."""
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim` from the symbols already in this process (no library search, no subprocess), or None."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not had back (glibc's `mallinfo2`, every arena, mapped chunks
    included), or None where there is no glibc 2.33+: what grows when a process keeps what it no longer needs."""
    info = _mallinfo2()
    if info is None:
        return None
    got = info()
    return got.uordblks + got.hblkhd


@lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's `mallinfo2` from the symbols already in this process, returning its struct, or None."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        found = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    found.restype = Info
    return found
