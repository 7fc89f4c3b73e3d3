"""`compute_dtype: auto` by a fixed rule from the CPU's flags, resolved without torch, and in the keys."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.config import LoraConfig, ModelConfig, QuantizationConfig
from loraflow.hardware import FLAGS_ENV, cpu_flags, machine, resolve_compute_dtype, why_dtype

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.parametrize("flags, want", [
    ("fpu sse2 avx2 avx512f avx512_bf16", "bfloat16"),  # AMD Zen 4, Intel Cooper Lake
    ("fpu sse2 avx2 avx512f amx_tile amx_bf16", "bfloat16"),  # AMX without the AVX-512 flag listed
    ("fpu sse2 avx2 avx512f avx512bw", "float32"),  # AVX-512 but no bf16: emulated, slower than fp32
    ("fpu sse2 avx2", "float32"),
    ("", "float32"),
])
def test_auto_picks_bf16_exactly_where_the_cpu_has_native_bf16(cpu_only, monkeypatch, flags, want):
    monkeypatch.setenv(FLAGS_ENV, flags)
    assert resolve_compute_dtype("auto") == want
    assert want in why_dtype("auto") and "auto: CPU has" in why_dtype("auto")
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_compute_dtype(explicit) == explicit
    assert "set in the config" in why_dtype("float32")


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86-64 Linux")
def test_flags_are_read_from_this_machine(monkeypatch):
    monkeypatch.delenv(FLAGS_ENV, raising=False)
    flags = cpu_flags()
    assert {"fpu", "sse2"} <= flags  # every x86-64 CPU has them
    info = machine()
    assert info["cpu_flags"]["avx512_bf16"] == ("avx512_bf16" in flags) and info["cpu_flags_forced"] is False


def test_resolving_auto_imports_no_torch(cpu_only):
    code = ("import sys; from loraflow.hardware import resolve; from loraflow.config import build_config; "
            "cfg = resolve(build_config({})); "
            "assert cfg.quantization.compute_dtype in ('float32', 'bfloat16'), cfg.quantization; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(cfg.quantization.compute_dtype)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == resolve_compute_dtype("auto")


def test_the_resolved_dtype_is_in_the_model_key(cpu_only, monkeypatch, tiny_llama_dir, tmp_path):
    from tests_support import build_model

    model, lora = ModelConfig(name_or_path=str(tiny_llama_dir)), LoraConfig(r=4)
    monkeypatch.setenv(FLAGS_ENV, "avx2 avx512_bf16")
    on_bf16_cpu = build_model(model, QuantizationConfig(compute_dtype="auto"), lora, tmp_path)
    assert on_bf16_cpu.info["compute_dtype"] == "bfloat16"
    # 'auto' and the dtype it stands for are one setting: one key, one folder
    assert build_model(model, QuantizationConfig(compute_dtype="bfloat16"), lora, tmp_path).fingerprint == on_bf16_cpu.fingerprint
    monkeypatch.setenv(FLAGS_ENV, "avx2")
    on_fp32_cpu = build_model(model, QuantizationConfig(compute_dtype="auto"), lora, tmp_path)
    assert on_fp32_cpu.info["compute_dtype"] == "float32" and on_fp32_cpu.fingerprint != on_bf16_cpu.fingerprint


@pytest.mark.parametrize("flags, dtype, bf16, want", [
    ("avx2 avx512_bf16", "auto", "auto", True),  # a bf16 CPU: autocast, as on a GPU with bf16
    ("avx2", "auto", "auto", False),  # fp32 compute: nothing to autocast to
    ("avx2 avx512_bf16", "float32", "auto", False),  # the dtype set in the config decides, not the CPU
    ("avx2", "auto", True, True),  # set: kept
    ("avx2 avx512_bf16", "auto", False, False),
])
def test_bf16_autocast_follows_the_compute_dtype_and_is_resolved_into_the_train_key(cpu_only, monkeypatch, flags,
                                                                                   dtype, bf16, want):
    from loraflow import store
    from loraflow.config import build_config
    from loraflow.hardware import resolve

    monkeypatch.setenv(FLAGS_ENV, flags)
    cfg = build_config({"quantization": {"compute_dtype": dtype}, "train": {"bf16": bf16}})
    assert resolve(cfg).train.bf16 is want
    explicit = build_config({"quantization": {"compute_dtype": dtype}, "train": {"bf16": want}})
    # 'auto' and what it stands for are one setting: one train key
    assert store.train_key(resolve(cfg), "t", "m").key == store.train_key(resolve(explicit), "t", "m").key
    other = build_config({"quantization": {"compute_dtype": dtype}, "train": {"bf16": not want}})
    assert store.train_key(resolve(other), "t", "m").key != store.train_key(resolve(cfg), "t", "m").key


GROWTH = """
import torch
from loraflow.hardware import heap_in_use
layer = torch.nn.Linear(64, 64).to(torch.bfloat16)
def step(rows):  # a forward and backward of a new shape, as a batch padded to its longest example has
    x = torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
for rows in range(1, 101):
    step(rows)
before = heap_in_use()
for rows in range(101, 301):
    step(rows)
print((heap_in_use() - before) / 2**20)
"""


def test_a_training_process_keeps_a_bounded_number_of_cpu_kernels_as_batch_shapes_change(monkeypatch):
    """oneDNN keeps the kernels of every shape it met (1024 a cache, ~1 MB each): a CPU training process, whose
    batches change shape at almost every step, grew by ~12 MB a step. The training process's environment bounds
    both caches, and a user's own setting wins."""
    from loraflow.hardware import heap_in_use
    from loraflow.stages.launch import _child_env

    if heap_in_use() is None:
        pytest.skip("needs glibc 2.33+ (mallinfo2) to read the heap")
    for key in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(key, raising=False)
    env = {**_child_env(), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", GROWTH], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    grown_mb = float(out.stdout.split()[-1])
    assert grown_mb < 40, f"200 new shapes grew the heap by {grown_mb:.0f} MB (unbounded: ~2 MB a shape)"

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert _child_env()["LRU_CACHE_CAPACITY"] == "7"
