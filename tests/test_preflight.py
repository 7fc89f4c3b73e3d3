"""Pre-flight (`loraflow validate`, and the flow's first task): what a run will meet, before any weight loads.
Each bad input exits 1 with one error line naming the fix, and nothing is written under the output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from loraflow.cli.main import main
from tests_support import write_examples


def write_config(tmp_path: Path, model_dir: Path, source: Path, **sections) -> Path:
    cfg = {
        "data": {"source": str(source), "input_column": "text", "target_column": "summary", "test_size": 0.125},
        "prompt": {"style": "chat", "template": "Summarize: {input}", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(model_dir)},
        "run": {"output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def validate(capsys, *argv: str) -> tuple[int, str]:
    code = main(["validate", *argv])
    return code, capsys.readouterr().out


def test_a_good_config_reports_sizes_lengths_and_what_it_checked_as(tmp_path, tiny_llama_dir, capsys):
    path = write_config(tmp_path, tiny_llama_dir, write_examples(tmp_path / "toy.jsonl"))
    code, out = validate(capsys, str(path), "--set", "prompt.template=Question: {input}", "--set", "model.revision=1.0")
    assert code == 0, out
    assert out.splitlines()[0] == f"pre-flight of {path} --set prompt.template=Question: {{input}} --set model.revision=1.0"
    assert "ok       data: 78 train / 8 validation / 10 test rows" in out  # 96 rows, by the split hashes
    assert "template reads {input}" in out and "prefix of the full conversation, as text and as tokens" in out
    assert "prompt tokens, 78 sampled training rows:" in out and "#" in out  # the histograms
    assert "memory: train, batch 4 x 57 tokens, gradient checkpointing on (auto)" in out  # on a CPU
    assert out.rstrip().endswith("result: 0 errors, 0 warnings")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case, override, error", [
    ("a missing input column", "data.input_column=txt",
     "data.input_column: no column 'txt' in the pool split of '{source}': did you mean 'text'?"),
    ("a misspelled placeholder", "prompt.template=Summarize: {inptu}",
     "prompt.template uses {inptu} but the data has no such column: did you mean {input}?"),
    ("a model folder that does not exist", "model.name_or_path={tmp}/no-such-model",
     "model.name_or_path: '{tmp}/no-such-model' is not a model folder (no config.json)"),
    ("no room left for the prompt", "prompt.max_target_length=60",
     "none of the 10 test prompts fits prompt.max_length - max_target_length = 4 tokens"),
])
def test_each_bad_input_exits_1_with_one_error_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys, case,
                                                                      override, error):
    source = write_examples(tmp_path / "toy.jsonl")
    path = write_config(tmp_path, tiny_llama_dir, source)
    code, out = validate(capsys, str(path), "--set", override.replace("{tmp}", str(tmp_path)))
    errors = [line for line in out.splitlines() if line.startswith("error ")]
    assert code == 1 and len(errors) == 1, out
    assert error.replace("{source}", str(source)).replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
    assert out.rstrip().endswith("result: 1 error, 0 warnings") or "result: 1 error" in out
    assert not (tmp_path / "runs").exists()


def test_a_bad_conversation_fails_validate_in_one_line(tmp_path, tiny_llama_dir, capsys):
    source = tmp_path / "chats.jsonl"
    rows = [[{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}] for i in range(20)]
    rows[7][1]["role"] = "bot"
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    path = write_config(tmp_path, tiny_llama_dir, source, data={"format": "messages"})
    code, out = validate(capsys, str(path))
    errors = [line for line in out.splitlines() if line.startswith("error ")]
    assert code == 1 and len(errors) == 1 and "row 7 of the pool split, message 1 has the unknown role 'bot'" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_csv_without_the_input_column_fails_before_any_model_file_is_read(tmp_path, tiny_llama_dir, capsys):
    source = tmp_path / "rows.csv"
    source.write_text("document,summary\n" + "".join(f"text {i},sum {i}\n" for i in range(20)))
    path = write_config(tmp_path, tiny_llama_dir, source, data={"input_column": "input"})
    code, out = validate(capsys, str(path))
    assert code == 1 and "data.input_column: no column 'input'" in out and "available columns are document, summary" in out


def test_split_files_whose_targets_differ_in_type_load_as_lists_of_references(tmp_path):
    from loraflow.config import DataConfig
    from loraflow.stages.data import build_splits

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"input": f"doc {i}", "target": f"sum {i}"}) + "\n"
                                                for i in range(20)))
    (folder / "test.jsonl").write_text("".join(json.dumps({"input": f"test {i}", "target": [f"a {i}", f"b {i}"]}) + "\n"
                                               for i in range(5)))
    splits, _, _ = build_splits(DataConfig(source=str(folder)), tmp_path / "scratch")
    assert splits["test"][0]["references"] == ["a 0", "b 0"] and splits["test"][0]["target"] == "a 0"
    assert splits["train"][0]["references"] == [splits["train"][0]["target"]]


def test_validate_config_only_checks_fields_and_types(capsys):
    code, out = validate(capsys, "configs/gpu-qwen2.5-0.5b-scitldr.yaml", "--config-only")  # hub ids: no network here
    assert code == 0 and "is a valid loraflow config (fields and types)" in out


def test_the_flow_fails_in_its_preflight_task_before_any_stage_writes(tmp_path, tiny_llama_dir, prefect_harness):
    from flows.finetune import finetune
    from loraflow.config import load_config

    path = write_config(tmp_path, tiny_llama_dir, write_examples(tmp_path / "toy.jsonl"),
                        prompt={"template": "Summarize: {inptu}"})
    state = finetune(load_config(path), return_state=True)
    assert state.is_failed() and "{inptu}" in str(state.message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))
    # the report is the run's pre-flight artifact
    import anyio
    from prefect.client.orchestration import get_client

    async def latest() -> str:
        async with get_client() as client:
            return (await client.read_latest_artifacts())  # one per key

    artifacts = {a.key: a for a in anyio.run(latest) if a.key}
    assert "pre-flight" in artifacts and "prompt.template uses {inptu}" in artifacts["pre-flight"].data
    assert artifacts["pre-flight"].flow_run_id == state.state_details.flow_run_id


def test_known_harmless_library_warnings_are_silenced_once_and_others_still_show():
    import subprocess
    import sys

    # bitsandbytes warns at import on an AVX512-BF16 CPU that it cannot fetch a kernel loraflow never uses; peft
    # reads transformers' deprecated is_gradient_checkpointing. Neither reaches the user; another warning does.
    code = (
        "import warnings, loraflow, bitsandbytes\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
        "warnings.warn('a warning the user can act on', FutureWarning)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "gemm_4bit_forward" not in err and "is_gradient_checkpointing" not in err
    assert "a warning the user can act on" in err


def test_the_memory_estimate_counts_what_each_setting_changes(tiny_llama_dir):
    from transformers import AutoConfig

    from loraflow.stages import memory
    from loraflow.config import build_config

    shapes = memory.shapes(AutoConfig.from_pretrained(tiny_llama_dir))
    assert shapes["layers"] == 2 and shapes["hidden"] == 64 and len(shapes["linear"]) == 2 * 7
    cfg = build_config({"quantization": {"mode": "nf4", "compute_dtype": "bfloat16"}})
    plain = memory.training(cfg, shapes, 8, 512, 8 * 32, False, False)
    deep = {**shapes, "layers": 30}  # checkpointing keeps each layer's input and recomputes one layer at a time
    assert memory.training(cfg, deep, 8, 512, 256, False, True)["activations"] < \
        memory.training(cfg, deep, 8, 512, 256, False, False)["activations"] / 5
    everywhere = cfg.model_copy(update={"train": cfg.train.model_copy(update={"label_only_logits": False})})
    assert memory.training(everywhere, shapes, 8, 512, 8 * 32, False, False)["logits"] == 16 * plain["logits"]
    full = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"mode": "none"})})
    linear = sum(i * o for _, i, o in shapes["linear"])
    quantized_bytes = memory.training(full, shapes, 8, 512, 256, False, False)["weights"] - plain["weights"]
    assert quantized_bytes == pytest.approx(linear * (2 - 0.5 - 1 / 64))  # bf16 vs 4 bits + a byte per 64 weights
    # the collator pads a batch to a multiple of train.pad_to_multiple_of (16): 500 tokens are trained as 512
    assert memory.training(cfg, shapes, 8, 500, 256, False, False) == memory.training(cfg, shapes, 8, 512, 256, False, False)
    exact = cfg.model_copy(update={"train": cfg.train.model_copy(update={"pad_to_multiple_of": 1})})
    assert memory.training(exact, shapes, 8, 500, 256, False, False)["activations"] < plain["activations"]
    # bf16 autocast (train.bf16: auto with bf16 compute): a bf16 copy of the LoRA weights for the step, and the CPU
    # runtime measured under autocast; without it, the fp32 LoRA path's
    params = sum(cfg.lora.r * (i + o) for _, i, o in shapes["linear"])
    no_autocast = cfg.model_copy(update={"train": cfg.train.model_copy(update={"bf16": False})})
    off = memory.training(no_autocast, shapes, 8, 512, 256, False, False)
    assert plain["lora+adam"] == params * 18 and off["lora+adam"] == params * 16
    assert plain["runtime"] == memory.RUNTIME_CPU_TRAIN_AUTOCAST and off["runtime"] == memory.RUNTIME_CPU_TRAIN

    # evaluation, as loraflow.stages.evaluate decides: on a CPU the weights dequantized to bf16 and the fp32 adapter beside
    # them; merged (eval.merge) no adapter; on a GPU the 4-bit weights
    lora = sum(cfg.lora.r * (i + o) for _, i, o in shapes["linear"]) * 4
    cpu = memory.evaluation(cfg, shapes, 256, cuda=False)
    assert cpu["adapter"] == lora and cpu["weights"] == pytest.approx(linear * 2 + shapes["other_params"] * 2)
    merged = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"merge": True})})
    assert memory.evaluation(merged, shapes, 256, cuda=False)["adapter"] == 0
    gpu = memory.evaluation(merged, shapes, 256, cuda=True)  # 4-bit weights: never merged into
    assert gpu["adapter"] == lora and gpu["weights"] < cpu["weights"]


def test_the_estimates_meta_model_waits_for_a_model_build_in_another_thread(tiny_llama_dir):
    """Building even a meta-device model sets torch's default dtype to the config's for the whole process (and
    transformers' other build-time patches): the estimate holds the one model-build lock, as every model build
    does (`store.buildlock`), or a LoRA built meanwhile in another thread (the early training process runs its
    stages in threads) could come out in the config's dtype."""
    import threading

    import torch
    from transformers import AutoConfig

    from loraflow.stages import memory
    from loraflow.store.buildlock import MODEL_BUILD

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.dtype = torch.bfloat16
    done = threading.Event()
    worker = threading.Thread(target=lambda: (memory.shapes(config), done.set()), daemon=True)
    with MODEL_BUILD:  # a build in progress
        worker.start()
        assert not done.wait(2), "the estimate built its meta model during another thread's model build"
        assert torch.get_default_dtype() == torch.float32
    worker.join(60)
    assert done.is_set() and torch.get_default_dtype() == torch.float32


def test_the_estimates_shapes_are_built_once_per_config_and_then_wait_for_no_model_build(tiny_llama_dir):
    """The pre-flight's estimate and the train stage's checkpointing choice (`auto`) run in the same process, the
    training process started with the run: the second reuses the first's shapes, and waits for no model build."""
    import threading

    from transformers import AutoConfig

    from loraflow.stages import memory
    from loraflow.store.buildlock import MODEL_BUILD

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.max_position_embeddings += 1  # a config no other test has built
    first = memory.shapes(config)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(memory.shapes(AutoConfig.from_pretrained(tiny_llama_dir,
                              max_position_embeddings=config.max_position_embeddings))), daemon=True)
    with MODEL_BUILD:  # a model loading in another thread
        worker.start()
        worker.join(30)
        assert got == [first], "the estimate waited for another thread's model build"


@pytest.mark.parametrize("setting, code, says", [
    ("false", 1, "set train.gradient_checkpointing=auto (or true), which needs"),
    ("auto", 0, "gradient checkpointing on (auto)"),
])
def test_a_run_over_the_memory_budget_says_how_to_fit(tmp_path, tiny_llama_dir, capsys, monkeypatch, setting, code,
                                                       says):
    from loraflow.stages import memory
    from loraflow.config import load_config
    from loraflow.stages.preflight import run_checks

    path = write_config(tmp_path, tiny_llama_dir, write_examples(tmp_path / "toy.jsonl"),
                        train={"per_device_train_batch_size": 64})
    facts = run_checks(load_config(path), "test").facts
    assert facts["train_checkpointed_bytes"] < facts["train_bytes"] < facts["budget_bytes"]  # GBs free here
    # a machine with less free memory: between what training needs with and without checkpointing
    budget = (facts["train_checkpointed_bytes"] + facts["train_bytes"]) / 2
    monkeypatch.setattr(memory, "available", lambda cuda: (budget, "RAM"))
    got, out = validate(capsys, str(path), "--set", f"train.gradient_checkpointing={setting}")
    assert got == code and says in out, out


def test_auto_checkpointing_is_on_on_a_cpu_and_on_a_gpu_only_over_the_budget(tmp_path, tiny_llama_dir, monkeypatch):
    from loraflow.stages import memory
    from loraflow.config import load_config
    from loraflow.stages.train.stage import resolve_checkpointing

    cfg = load_config(write_config(tmp_path, tiny_llama_dir, tmp_path / "unused.jsonl"))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"train": {"max_prompt_tokens": 40, "max_target_tokens": 12}}))
    assert resolve_checkpointing(cfg, str(tiny_llama_dir), stats) is True  # this process's device: the CPU
    assert resolve_checkpointing(cfg, str(tiny_llama_dir), stats, cuda=False) is True  # GBs free here, on anyway
    monkeypatch.setattr(memory, "available", lambda cuda: (80e9, "GPU memory"))
    assert resolve_checkpointing(cfg, str(tiny_llama_dir), stats, cuda=True) is False
    monkeypatch.setattr(memory, "available", lambda cuda: (1e6, "GPU memory"))
    assert resolve_checkpointing(cfg, str(tiny_llama_dir), stats, cuda=True) is True
    fixed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": False})})
    assert resolve_checkpointing(fixed, str(tiny_llama_dir), stats) is False


def test_probe_runs_one_real_step_and_estimates_the_training_time(tmp_path, tiny_llama_dir, capsys):
    path = write_config(tmp_path, tiny_llama_dir, write_examples(tmp_path / "toy.jsonl"), train={"max_steps": 40})
    code, out = validate(capsys, str(path), "--probe")
    assert code == 0, out
    line = next(x for x in out.splitlines() if "probe:" in x)
    assert "one step of 2 rows" in line and "min for 40 steps" in line
    assert not (tmp_path / "runs").exists()


def test_a_template_that_formats_a_list_column_says_it_is_not_text(tmp_path, tiny_llama_dir, capsys):
    source = tmp_path / "tagged.jsonl"
    source.write_text("".join(json.dumps({"text": f"report {i}", "summary": f"sum {i}", "tags": ["a", "b"]}) + "\n"
                              for i in range(40)))
    path = write_config(tmp_path, tiny_llama_dir, source, prompt={"template": "Tags {tags}: {input}"})
    code, out = validate(capsys, str(path))
    assert code == 1 and "prompt.template uses {tags}, a column of List(Value('string'))" in out, out


def test_a_system_prompt_for_a_chat_template_without_a_system_role_names_the_fix(tmp_path, tiny_llama_dir, capsys):
    import shutil

    strict = tmp_path / "strict-model"
    shutil.copytree(tiny_llama_dir, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                               "not supported') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    (strict / "chat_template.jinja").unlink(missing_ok=True)
    path = write_config(tmp_path, strict, write_examples(tmp_path / "toy.jsonl"), prompt={"system": "Be brief."})
    code, out = validate(capsys, str(path))
    assert code == 1 and "System role not supported" in out and "unset prompt.system" in out, out


def test_a_chat_template_that_rewrites_history_is_reported(tmp_path, tiny_llama_dir, capsys):
    import shutil

    # drops the system message once an answer follows it, as some templates rewrite earlier turns
    rewriting = tmp_path / "rewriting-model"
    shutil.copytree(tiny_llama_dir, rewriting)
    config = json.loads((rewriting / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% set answered = messages[-1]['role'] == 'assistant' %}{% for m in messages %}"
        "{% if not (answered and m['role'] == 'system') %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (rewriting / "tokenizer_config.json").write_text(json.dumps(config))
    (rewriting / "chat_template.jinja").unlink(missing_ok=True)
    path = write_config(tmp_path, rewriting, write_examples(tmp_path / "toy.jsonl"),
                        prompt={"system": "Be brief.", "max_length": 128})
    code, out = validate(capsys, str(path))
    assert code == 0 and "warning  prompt: for 78 of 78 rows the chat template renders the conversation before" in out, out


def test_a_template_may_name_the_input_column_by_its_own_name(tmp_path, tiny_llama_dir, capsys):
    """The CSV a newcomer brings: `Question Text` is the input, and the template names it so. (Before: pre-flight
    said to make it the input, which it already was.)"""
    import csv

    source = tmp_path / "qa.csv"
    rows = [json.loads(line) for line in write_examples(tmp_path / "toy.jsonl").read_text().splitlines()]
    with source.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Question Text", "Expected Reply"])
        out.writerows([r["text"], r["summary"]] for r in rows)
    path = write_config(tmp_path, tiny_llama_dir, source, data={"input_column": "Question Text",
                                                                "target_column": "Expected Reply"})
    code, out = validate(capsys, str(path), "--set", "prompt.template=Answer briefly: {Question Text}")
    assert code == 0, out
    assert "template reads {input}" in out and out.rstrip().endswith("result: 0 errors, 0 warnings")
    code, shown = main(["show-config", str(path), "--set", "prompt.template=Answer briefly: {Question Text}"]), \
        capsys.readouterr().out
    assert code == 0 and "template: 'Answer briefly: {input}'" in shown  # one prompt, one key, however it is named


def test_the_preflight_hands_its_tokenizer_to_the_stages_after_it(tmp_path, tiny_llama_dir, tokenizer_loads):
    """The pre-flight runs in the training process, in a thread of its own; the tokenize and train stages there
    take the tokenizer it loaded instead of loading their own."""
    import threading

    from loraflow.config import load_config
    from loraflow.stages.preflight import run_checks
    from loraflow.stages.tokenize import take_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    cfg = load_config(write_config(tmp_path, model, write_examples(tmp_path / "toy.jsonl")))
    checks = threading.Thread(target=lambda: run_checks(cfg, "test"))
    checks.start()
    checks.join()
    tokenizer_loads.clear()
    take_tokenizer(model)
    assert tokenizer_loads == []


def test_the_pre_flight_reads_the_splits_the_flow_built_ahead_for_its_data_config_and_no_others(tmp_path, tiny_llama_dir):
    from loraflow.config import load_config
    from loraflow.stages import data
    from loraflow.stages.preflight import run_checks

    source = write_examples(tmp_path / "toy.jsonl")
    cfg = load_config(write_config(tmp_path, tiny_llama_dir, source))
    folder = data.reserve_ahead(cfg.data)
    try:
        data.build_ahead(cfg.data)
        shutil.copy(source, tmp_path / "copy.jsonl")
        with source.open("a") as f:  # the file changed after the build: what the checks read tells which they used
            f.writelines((tmp_path / "copy.jsonl").read_text().splitlines(keepends=True)[:16])
        lines = lambda report: [text for _, text in report.lines if text.startswith("data:")]  # noqa: E731
        assert lines(run_checks(cfg, "test", data_ahead=str(folder)))[0].startswith("data: 78 train / 8 validation")
        assert not lines(run_checks(cfg, "test"))[0].startswith("data: 78 train / 8 validation")
        other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": cfg.data.seed + 1})})
        assert not lines(run_checks(other, "test", data_ahead=str(folder)))[0].startswith("data: 78 train / 8 valid")
    finally:
        data.drop_ahead(cfg.data)
    assert not folder.exists()
