"""Nothing chooses on the test split: the best checkpoint is chosen on validation losses (sweep ranking:
tests/test_sweep.py; promotion: tests/test_retrain.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loraflow.config import build_config
from tests_support import build_model, prepare_data, tokenize_data, train_adapter, write_examples


def _folder(root: Path) -> Path:
    """train/validation: the toy task (repeat the input's colour and animal); test: summaries of number words
    the training targets never hold, a loss of its own however much or little of the task was learned."""
    folder = root / "data"
    folder.mkdir()
    rows = [json.loads(line) for line in write_examples(root / "toy.jsonl", 96).read_text().splitlines()]
    rng = random.Random(0)

    numbers = ["seven", "forty", "ninety", "twelve", "three", "eleven"]

    def wrong(r: dict) -> dict:
        return {**r, "summary": " ".join(rng.sample(numbers, 3))}

    unrelated = [wrong(r) for r in rows[80:]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[64:80]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unrelated))
    return folder


def _split_loss(train_dir: Path, tokenized, tiny_llama_dir: Path, split: str) -> float:
    """The final adapter's mean loss on a split, in batches of 8 as Trainer evaluates."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.stages.train.collators import CompletionCollator

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                      train_dir / "adapter").eval()
    rows = datasets.load_from_disk(f"{tokenized.path}/dataset")[split]
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = rows.select(range(i, min(i + 8, len(rows))))
            inputs = CompletionCollator(pad_token_id=0)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in batch])
            losses += [float(model(**inputs).loss)] * len(batch)
    return sum(losses) / len(losses)


def test_checkpoints_are_chosen_on_validation_never_on_test(tiny_llama_dir, tmp_path):
    cfg = build_config({
        "data": {"source": str(_folder(tmp_path)), "input_column": "text",
                 "target_column": "summary"},
        "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(tiny_llama_dir)},
        "quantization": {"mode": "none", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 16, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 4,
                  "eval_steps": 4, "save_steps": 4, "save_total_limit": 4, "load_best_model_at_end": True,
                  "lr_scheduler_type": "constant", "report_to": []},
    })
    out = tmp_path / "out"
    data = prepare_data(cfg.data, out)
    tokenized = tokenize_data(data, cfg.prompt, tiny_llama_dir, out)
    trained = train_adapter(cfg, tokenized, build_model(cfg.model, cfg.quantization, cfg.lora, out), out)
    state = json.loads((Path(trained.path) / "trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert sorted(evals) == [4, 8, 12, 16]
    best = min(evals, key=evals.get)
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best}"
    # The losses the choice read are the validation split's: the kept adapter's validation loss is the
    # best logged one, and its loss on the test rows (number words) is another number.
    validation = _split_loss(Path(trained.path), tokenized, tiny_llama_dir, "validation")
    test = _split_loss(Path(trained.path), tokenized, tiny_llama_dir, "test")
    assert abs(validation - evals[best]) < 1e-3 * evals[best], (validation, evals)
    assert abs(test - evals[best]) > 0.1, (test, evals)


def test_generation_rouge_on_validation_drives_best_checkpoint_and_early_stopping(tiny_llama_dir, tmp_path):
    # A learning rate too small to change any generated word: validation ROUGE-L never improves after
    # the first evaluation, so early stopping (patience 1) ends training at the second one.
    cfg = build_config({
        "data": {"source": str(_folder(tmp_path)), "input_column": "text", "target_column": "summary"},
        "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(tiny_llama_dir)},
        "quantization": {"mode": "none", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 1e-12, "logging_steps": 2,
                  "eval_steps": 2, "save_steps": 2, "eval_generate_samples": 4, "metric_for_best_model": "eval_rougeL",
                  "early_stopping_patience": 1, "report_to": []},
        "eval": {"max_new_tokens": 4},
    })
    out = tmp_path / "out"
    data = prepare_data(cfg.data, out)
    tokenized = tokenize_data(data, cfg.prompt, tiny_llama_dir, out)
    trained = train_adapter(cfg, tokenized, build_model(cfg.model, cfg.quantization, cfg.lora, out), out)
    state = json.loads((Path(trained.path) / "trainer_state.json").read_text())
    rouge = [e["eval_rougeL"] for e in state["log_history"] if "eval_rougeL" in e]
    assert len(rouge) == 2 and rouge[0] == rouge[1] and 0 <= rouge[0] <= 1
    assert trained.info["global_step"] == 4 < 20  # stopped early, by the validation metric
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-2"


@pytest.mark.parametrize("field, short_len, long_len", [("max_steps", 8, 12), ("num_train_epochs", 1, 1.5)])
def test_raising_the_length_continues_the_shorter_run(tiny_llama_dir, tmp_path, field, short_len, long_len):
    # 64 train rows, batch 8: one epoch is 8 steps, 1.5 epochs 12
    from loraflow.hardware import resolve
    from loraflow.stages.train.stage import seed_continuation
    from tests_support import train_key

    source = str(_folder(tmp_path))

    def config(length):
        steps = length if field == "max_steps" else -1
        return build_config({
            "data": {"source": source, "input_column": "text", "target_column": "summary"},
            "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
            "model": {"name_or_path": str(tiny_llama_dir)},
            "quantization": {"mode": "none", "compute_dtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": steps, "num_train_epochs": length if field == "num_train_epochs" else 1.0,
                      "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1,
                      "save_steps": 100, "lr_scheduler_type": "constant", "report_to": []},
        })

    out = tmp_path / "out"
    data = prepare_data(config(short_len).data, out)
    tokenized = tokenize_data(data, config(short_len).prompt, tiny_llama_dir, out)
    model = build_model(config(short_len).model, config(short_len).quantization, config(short_len).lora, out)
    short = train_adapter(config(short_len), tokenized, model, out)
    assert short.info["global_step"] == 8
    assert (Path(short.path) / "checkpoints" / "checkpoint-8" / "trainer_state.json").is_file()  # the last step
    seeded = seed_continuation(resolve(config(long_len)), out, train_key(config(long_len), tokenized, model))
    assert seeded is not None and seeded.name == "checkpoint-8"
    longer = train_adapter(config(long_len), tokenized, model, out)
    assert longer.info["resumed_from"].endswith("checkpoint-8") and longer.info["global_step"] == 12
    straight = train_adapter(config(long_len), tokenized, model, tmp_path / "straight")
    assert straight.info["resumed_from"] is None
    assert abs(longer.info["last_logged_loss"] - straight.info["last_logged_loss"]) <= 1e-3 * straight.info["last_logged_loss"]
    shorter = 4 if field == "max_steps" else 0.5
    assert seed_continuation(resolve(config(shorter)), out, train_key(config(shorter), tokenized, model)) is None  # shorter than what exists: a new run