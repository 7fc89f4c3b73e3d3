"""The real built-in default (SmolLM2-135M-Instruct from the GGUF wheel, NF4, aclsum) through the CLI.

Marked `demo`: `uv run pytest -m demo` (about 3 minutes on 2 cores). Sample and step caps shrink it;
everything else is the shipped configs/demo.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.demo
def test_demo_config_runs_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "loraflow.cli.main", "run",
        "--set", "data.max_train_samples=8", "--set", "data.max_eval_samples=4",
        "--set", "train.max_steps=2", "--set", "train.logging_steps=1", "--set", "train.save_steps=2",
        "--set", "eval.max_new_tokens=16", "--set", "eval.max_validation_samples=4", "--set", f"run.output_dir={out}",
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROUGE on 4 test examples" in proc.stdout and "fine-tuned" in proc.stdout
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.rindex('{\n  "adapter"') :])
    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file() and adapter.is_relative_to(out)
    metrics = json.loads(next(out.glob("evaluate/*/metrics.json")).read_text())
    assert metrics["n_examples"] == 4 and 0 < metrics["base"]["rougeL_fmeasure"] < 1
    assert metrics["validation"]["n_examples"] == 4 and "vs_base" in metrics
    im_end = 2  # SmolLM2's <|im_end|>: what its chat template ends a turn with, and eos too
    assert im_end in metrics["stop_token_ids"]
    state = json.loads(next(out.glob("train/*/trainer_state.json")).read_text())
    assert state["global_step"] == 2 and any("loss" in e for e in state["log_history"])


@pytest.mark.demo
def test_demo_config_exports_merged_and_gguf_from_a_fresh_cache(tmp_path):
    """`loraflow export --format both` computes the missing stages as `run` would, then writes both exports,
    each passing parity against the evaluated SmolLM2 (the q8_0 GGUF by its looser gate). In fp32, where a merge
    keeps the adapter's updates to fp32 rounding: in bf16 a merge of so small an adapter rounds most of it away
    and may rightly fail the gate (README, "Export")."""
    out = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "loraflow.cli.main", "export", "--format", "both",
        "--set", "data.max_train_samples=8", "--set", "data.max_eval_samples=4", "--set", "train.max_steps=2",
        "--set", "train.save_steps=2", "--set", "eval.max_new_tokens=16", "--set", "eval.max_validation_samples=4",
        "--set", "export.parity_samples=4", "--set", f"run.output_dir={out}",
        "--set", "quantization.compute_dtype=float32",
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export parity with the evaluated model, 4 validation rows: passed" in proc.stdout
    (folder,) = out.glob("export/*/")
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] and [c["label"] for c in parity["checks"]] == ["merged", "gguf q8_0"]
    assert parity["checks"][0]["top1_agreement"] == 1.0  # fp32: the merge is the scored model to fp32 rounding
    gguf = next((folder / "gguf").glob("*.gguf"))
    assert 100 < gguf.stat().st_size / 2**20 < 200  # 135M parameters in 8.5 bits
    assert (folder / "merged" / "model.safetensors").is_file() and (folder / "merged" / "chat_template.jinja").is_file()
