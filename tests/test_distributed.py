"""The train stage as 2 DDP processes (torchrun, gloo on CPU) on the tiny model."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loraflow.config import build_config
from tests_support import build_model, prepare_data, run_train_worker, tokenize_data, train_key, worker_request, write_examples
from loraflow.stages.train.distributed import worker_command
from loraflow.stages.launch import WorkerFailed
from loraflow.stages.train.stage import last_checkpoint

# 128 examples, 16 held out: each rank gets 56 training examples, 14 optimizer steps per epoch exactly.
EXAMPLES, STEPS, SAVE, PROCESSES, BATCH, ACCUMULATION = 128, 28, 4, 2, 2, 2

# Imported by every Python process started with this folder on PYTHONPATH: rank 1's training step fails.
FAULT = """
import os
if os.environ.get("RANK") == "1":
    from loraflow.stages.train.trainer import CompletionTrainer

    def training_step(self, *args, **kwargs):
        raise RuntimeError("injected fault on rank 1")

    CompletionTrainer.training_step = training_step
"""


def ddp_config(root: Path, model_dir: Path, **train) -> object:
    return build_config({
        "data": {"source": str(write_examples(root / "toy.jsonl", EXAMPLES)), "input_column": "text", "target_column": "summary",
                 "test_size": 0.125},
        "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": STEPS, "save_steps": SAVE, "logging_steps": 4, "per_device_train_batch_size": BATCH,
                  "gradient_accumulation_steps": ACCUMULATION, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
                  "report_to": [], "num_processes": PROCESSES, **train},
        "eval": {"max_new_tokens": 6},
        "run": {"output_dir": str(root / "runs"), "cache_dir": str(root / "cache")},
    })


@pytest.fixture(scope="module")
def stages(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cfg = ddp_config(root, tiny_llama_dir)
    data = prepare_data(cfg.data, root / "shared")
    tokenized = tokenize_data(data, cfg.prompt, tiny_llama_dir, root / "shared")
    model = build_model(cfg.model, cfg.quantization, cfg.lora, root / "shared")
    return cfg, tokenized, model


@pytest.fixture(scope="module")
def uninterrupted(stages, tmp_path_factory):
    cfg, tokenized, model = stages
    return run_train_worker(cfg, tokenized, model, tmp_path_factory.mktemp("ddp-straight"))


def test_two_processes_train_one_adapter_with_the_combined_batch(uninterrupted):
    info = uninterrupted.info
    assert info["num_processes"] == PROCESSES and info["global_step"] == STEPS
    # Each optimizer step consumed processes x per-device batch x accumulation examples, counted on the ranks.
    assert info["effective_batch_size"] == PROCESSES * BATCH * ACCUMULATION
    assert info["examples_seen"] == STEPS * PROCESSES * BATCH * ACCUMULATION
    # Gradients were all-reduced: both ranks end with the same adapter (they diverge if DDP is bypassed).
    first, second = info["adapter_sum_per_rank"]
    assert first == pytest.approx(second, rel=1e-6, abs=1e-9)
    assert info["last_logged_loss"] < 0.8 * info["first_logged_loss"], info
    assert info["label_only_logits"] is True  # the LM head ran at label positions only, through DDP's forward
    # Rank 0 alone wrote the stage folder; the other rank left nothing behind.
    assert info["written_by_rank"] == 0
    train_root = Path(uninterrupted.path).parent
    assert [p.name for p in train_root.iterdir()] == [Path(uninterrupted.path).name]
    assert (Path(uninterrupted.path) / "adapter" / "adapter_model.safetensors").is_file()
    assert (Path(uninterrupted.path) / "manifest.json").is_file()


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_and_the_rerun_resumes(stages, uninterrupted, tmp_path):
    """Slow tier: the training children are stopped on purpose. Everyday: two ranks training one adapter in
    test_two_processes_train_one_adapter_with_the_combined_batch, a rank's failure in
    test_a_failing_rank_fails_the_stage_with_its_own_error, resuming from a checkpoint in
    test_choices.py::test_raising_the_length_continues_the_shorter_run."""
    cfg, tokenized, model = stages
    request = tmp_path / "request.json"
    request.write_text(worker_request(cfg, tokenized, model, tmp_path))
    checkpoints = tmp_path / "train" / f"{train_key(cfg, tokenized, model).key}.work" / "checkpoints"
    proc = subprocess.Popen(worker_command(PROCESSES, str(request)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (checkpoints / f"checkpoint-{SAVE}" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
    proc.wait(timeout=120)
    stopped_at = int(Path(last_checkpoint(checkpoints)).name.split("-")[-1])
    assert SAVE <= stopped_at < STEPS
    assert not (tmp_path / "result.json").exists()

    resumed = run_train_worker(cfg, tokenized, model, tmp_path)
    assert resumed.info["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert resumed.info["global_step"] == STEPS == uninterrupted.info["global_step"]
    first, second = resumed.info["adapter_sum_per_rank"]
    assert first == pytest.approx(second, rel=1e-6, abs=1e-9)
    assert resumed.info["last_logged_loss"] == pytest.approx(uninterrupted.info["last_logged_loss"], rel=1e-3)


def test_a_failing_rank_fails_the_stage_with_its_own_error(stages, tmp_path, monkeypatch, caplog):
    cfg, tokenized, model = stages
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fault"))
    with caplog.at_level(logging.INFO, logger="loraflow"):
        with pytest.raises(WorkerFailed, match=r"failed: rank 1: RuntimeError: injected fault on rank 1"):
            run_train_worker(cfg, tokenized, model, tmp_path / "out")
    assert "rank 1: RuntimeError: injected fault on rank 1" in [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert not list((tmp_path / "out" / "train").glob("*/manifest.json"))


@pytest.mark.parametrize("visible,expected", [("0,1,2,3", 4), ("", 1), ("-1", 1), ("GPU-5f1c", 1)])
def test_auto_processes_follow_the_visible_gpus(monkeypatch, visible, expected):
    from loraflow.hardware import resolve_processes

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert resolve_processes("auto") == expected
    assert resolve_processes(3) == 3


def test_several_processes_launch_through_torchrun():
    one, two = worker_command(1, "req.json"), worker_command(2, "req.json")
    assert one[1:] == ["-m", "loraflow.stages.worker", "req.json"]
    assert two[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in two
    assert two[-3:] == ["-m", "loraflow.stages.worker", "req.json"]


def test_bad_process_count_is_one_line_naming_the_fix():
    from loraflow.config import ConfigError

    with pytest.raises(ConfigError, match=r"^invalid config: train.num_processes: expected a number of processes >= 1 "
                                          r"or 'auto', e.g. --set train.num_processes=2 \(got 0\)$"):
        build_config({"train": {"num_processes": 0}})


def test_auto_and_the_count_it_stands_for_share_one_train_folder(monkeypatch):
    from loraflow.store.artifacts import Handle

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    up = Handle(stage="tokenize", path="/x", fingerprint="t"), Handle(stage="model", path="/y", fingerprint="m")
    auto, two, one = (build_config({"train": {"num_processes": n}}) for n in ("auto", 2, 1))
    assert train_key(auto, *up) == train_key(two, *up) != train_key(one, *up)
