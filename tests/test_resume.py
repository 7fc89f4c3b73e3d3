"""Training in a child process: killed (SIGKILL) or preempted (SIGTERM) runs resume where they stopped.

The uninterrupted reference trains in this process (`train_adapter`, what the worker runs): the child process is
what the interrupted runs test, not the reference."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow.config import build_config
from tests_support import build_model, prepare_data, run_train_worker, tokenize_data, train_key, worker_request, write_examples
from loraflow.stages.launch import WorkerFailed
from loraflow.stages.train.stage import last_checkpoint

STEPS, SAVE = 30, 5


@pytest.fixture(scope="module")
def stages(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cfg = build_config({
        "data": {"source": str(write_examples(root / "toy.jsonl")), "input_column": "text", "target_column": "summary"},
        "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(tiny_llama_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": STEPS, "save_steps": SAVE, "logging_steps": 5, "per_device_train_batch_size": 4,
                  "learning_rate": 5e-3, "save_total_limit": 3, "report_to": []},
    })
    data = prepare_data(cfg.data, root / "shared")
    tokenized = tokenize_data(data, cfg.prompt, tiny_llama_dir, root / "shared")
    model = build_model(cfg.model, cfg.quantization, cfg.lora, root / "shared")
    return cfg, tokenized, model


def _last_loss(train_dir: str) -> float:
    state = json.loads((Path(train_dir) / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e][-1]


def _start_worker(cfg, tokenized, model, out: Path) -> tuple[subprocess.Popen, Path]:
    request = out / "request.json"
    out.mkdir(parents=True, exist_ok=True)
    request.write_text(worker_request(cfg, tokenized, model, out))
    proc = subprocess.Popen([sys.executable, "-m", "loraflow.stages.worker", str(request)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, out / "train" / f"{train_key(cfg, tokenized, model).key}.work" / "checkpoints"


def _wait_for_checkpoint(proc, checkpoints: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not (checkpoints / f"checkpoint-{SAVE}" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(stages, tmp_path_factory):
    from tests_support import train_adapter

    cfg, tokenized, model = stages
    return train_adapter(cfg, tokenized, model, tmp_path_factory.mktemp("straight"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupted_training_resumes_and_matches(stages, uninterrupted, tmp_path, sig):
    """Slow tier: the training child is killed on purpose. Everyday: resuming from a checkpoint in
    test_choices.py::test_raising_the_length_continues_the_shorter_run, a failing child in
    test_failing_worker_fails_with_its_error."""
    cfg, tokenized, model = stages
    proc, checkpoints = _start_worker(cfg, tokenized, model, tmp_path)
    _wait_for_checkpoint(proc, checkpoints)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    stopped_at = int(Path(last_checkpoint(checkpoints)).name.split("-")[-1])
    assert not list((tmp_path / "train").glob("*/manifest.json")), "an interrupted run must publish nothing"
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and stopped_at >= SAVE
    else:
        # Preemption-safe: the worker saved the step it was on, not only the last scheduled checkpoint.
        assert code == 143 and "SIGTERM received" in proc.stderr.read()
        assert stopped_at > SAVE, f"SIGTERM should checkpoint the current step, got checkpoint-{stopped_at}"
    assert stopped_at < STEPS

    resumed = run_train_worker(cfg, tokenized, model, tmp_path)
    assert resumed.info["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert resumed.info["global_step"] == STEPS == uninterrupted.info["global_step"]
    assert _last_loss(resumed.path) == pytest.approx(_last_loss(uninterrupted.path), rel=1e-3)
    assert not (checkpoints.parent).exists(), "the work folder is folded into the finished stage folder"


def test_failing_worker_fails_with_its_error(stages, tmp_path):
    cfg, tokenized, model = stages
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"extra_args": {"no_such_argument": 1}})})
    with pytest.raises(WorkerFailed, match=r"train: the training process \(exit code 1\) failed: .*no_such_argument"):
        run_train_worker(bad, tokenized, model, tmp_path)


def test_a_finished_train_folder_is_reused_without_starting_a_worker(stages, uninterrupted, monkeypatch):
    # e.g. Prefect's cache records were cleared: the folder named by the key is complete, so no ~20 s worker start
    import loraflow.stages.launch as launch

    cfg, tokenized, model = stages

    def no_worker(*_a, **_k):
        raise AssertionError("a worker was started for a complete train folder")

    monkeypatch.setattr(launch.subprocess, "Popen", no_worker)
    again = run_train_worker(cfg, tokenized, model, Path(uninterrupted.path).parents[1])
    assert again == uninterrupted


def test_the_training_process_uses_the_keys_it_is_given(stages, tmp_path, monkeypatch):
    """The worker's `train_adapter` trains and publishes under the keys of its request, computing none."""
    from loraflow import store
    from loraflow.hardware import resolve
    from loraflow.stages.train.stage import train_adapter

    cfg, tokenized, model = stages
    cfg = resolve(_short(cfg, 2, save_steps=2))
    key = train_key(cfg, tokenized, model)

    def no_key(*_a, **_k):
        raise AssertionError("the training process computed a key")

    monkeypatch.setattr(store, "_make", no_key)
    done = train_adapter(cfg, tokenized, model, tmp_path, key)
    assert done.fingerprint == key.key == Path(done.path).name
    assert done.info["continuation_key"] == store.continuation(key) and done.info["global_step"] == 2


def _short(cfg, steps: int, **train):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps, **train})})


def test_checkpoints_survive_a_commit_that_fails_on_a_full_disk(stages, tmp_path, monkeypatch):
    """The manifest write at commit fails (ENOSPC): the checkpoints stay in the work folder and the rerun resumes.
    (Before: they were moved into the scratch folder and deleted with it.)"""
    import errno

    from loraflow.store import artifacts
    from tests_support import train_adapter

    cfg, tokenized, model = stages
    cfg = _short(cfg, SAVE + 1)
    write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name == artifacts.MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train_adapter(cfg, tokenized, model, tmp_path)
    monkeypatch.undo()
    assert not list((tmp_path / "train").glob("*/manifest.json")) and not list((tmp_path / "train").glob(".*tmp-*"))
    checkpoints = tmp_path / "train" / f"{train_key(cfg, tokenized, model).key}.work" / "checkpoints"
    assert last_checkpoint(checkpoints) is not None
    again = train_adapter(cfg, tokenized, model, tmp_path)
    assert again.info["resumed_from"] is not None and again.info["global_step"] == SAVE + 1


def test_a_non_finite_loss_or_adapter_fails_the_stage_and_publishes_nothing(stages, tmp_path):
    """fp16 overflow on a GPU makes NaNs; here a callback puts one in the adapter, as an overflow would."""
    from transformers import TrainerCallback

    from loraflow.stages.train.stage import NonFiniteTraining
    from tests_support import train_adapter

    class Overflow(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))

    cfg, tokenized, model = stages
    with pytest.raises(NonFiniteTraining, match=r"^train: the (training loss is nan|adapter weight .* is not finite) at "
                                                r"step 4; nothing was published: lower train.learning_rate"):
        train_adapter(_short(cfg, 4, logging_steps=1), tokenized, model, tmp_path, callbacks=[Overflow()])
    assert not list((tmp_path / "train").glob("*/manifest.json"))
