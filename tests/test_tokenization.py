"""Label masking, truncation and the tokenize stage on a real GPT-2 tokenizer (see conftest)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from loraflow.store.artifacts import Handle, is_complete
from loraflow.stages.prompts import IGNORE_INDEX
from loraflow.config import PromptConfig
from loraflow.stages.prompts import PromptError, end_of_turn, render_prompt
from loraflow.stages.tokenize import encode_example, load_tokenizer, tokenizer_digest
from tests_support import tokenize_data

ROW = {"input": "We study the effect of pretraining on long documents.", "target": "Pretraining helps.",
       "references": ["Pretraining helps."], "aspect": "outcome"}
INSTRUCTION = "Summarize the {aspect}:\n{input}\nSummary:"


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


def template(**kw) -> PromptConfig:
    return PromptConfig(style="template", template=INSTRUCTION, **kw)


def completion(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


@pytest.mark.parametrize("style", ["template", "chat"])
def test_labels_mask_the_prompt_and_keep_the_completion(tok, style):
    cfg = PromptConfig(style=style, template=INSTRUCTION, system="Be brief.")
    enc = encode_example(ROW, cfg, tok)
    n = len(enc["prompt_ids"])
    assert tok.decode(enc["prompt_ids"]) == render_prompt(ROW, cfg, tok)
    assert enc["input_ids"][:n] == enc["prompt_ids"]
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:] and IGNORE_INDEX not in enc["labels"][n:]
    # Tokenized on its own (no BPE merge with the prompt's last characters), then the end of turn
    # (here the chat template's '<|im_end|>\n', plain text to GPT-2, then EOS): the model learns to stop.
    stop = tok(end_of_turn(tok, cfg), add_special_tokens=False)["input_ids"]
    assert enc["labels"][n:] == tok(ROW["target"], add_special_tokens=False)["input_ids"] + stop
    assert enc["labels"][-1] == tok.eos_token_id and enc["truncated"] is False


def test_bos_is_added_once_for_tokenizers_that_use_one(gpt2_tokenizer_dir):
    bos_tok = load_tokenizer(gpt2_tokenizer_dir)
    bos_tok.add_bos_token = True  # like Llama: the tokenizer itself prepends BOS
    bos = bos_tok.bos_token_id
    plain = encode_example(ROW, template(), bos_tok)["prompt_ids"]
    assert plain[0] == bos and plain[1] != bos
    bos_tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # Llama-3 style
    chat = encode_example(ROW, PromptConfig(style="chat", template=INSTRUCTION), bos_tok)["prompt_ids"]
    assert chat[0] == bos and chat[1] != bos


@pytest.mark.parametrize("style", ["template", "chat"])
def test_truncation_cuts_the_input_and_keeps_instruction_header_and_target(tok, style):
    long_input = " ".join(f"word{i}" for i in range(400))
    cfg = PromptConfig(style=style, template=INSTRUCTION, max_length=64, max_target_length=16)
    enc = encode_example({**ROW, "input": long_input}, cfg, tok)
    assert enc["truncated"] is True and 48 <= len(enc["input_ids"]) <= 64  # cut to fit, not far below
    text = tok.decode(enc["prompt_ids"])
    expected_end = "\nSummary:" if style == "template" else "\nSummary:<|im_end|>\n<|im_start|>assistant\n"
    assert "Summarize the outcome:\nword0 word1 word2" in text and text.endswith(expected_end)
    kept = text.split("Summarize the outcome:\n")[1].removesuffix(expected_end)
    assert long_input.startswith(kept) and len(kept) < len(long_input) / 2
    assert tok.decode(completion(enc["labels"])) == "Pretraining helps." + end_of_turn(tok, cfg)


def test_generation_prompts_do_not_depend_on_the_reference(tok):
    # The same input with a short and a long reference: training fits each prompt around its own target,
    # but the prompt the model is asked at evaluation has one budget for every row.
    long_input = " ".join(f"word{i}" for i in range(400))
    cfg = PromptConfig(style="chat", template=INSTRUCTION, max_length=96, max_target_length=32)
    short = encode_example({**ROW, "input": long_input, "target": "Yes."}, cfg, tok)
    long = encode_example({**ROW, "input": long_input, "target": "very " * 40}, cfg, tok)
    assert short["prompt_ids"] == long["prompt_ids"] and len(short["prompt_ids"]) <= 96 - 32
    assert len(short["input_ids"]) - len(completion(short["labels"])) > len(short["prompt_ids"])  # training keeps more


def test_long_target_is_cut_to_max_target_length_and_keeps_eos(tok):
    enc = encode_example({**ROW, "target": "very " * 100}, template(max_length=128, max_target_length=10), tok)
    target = completion(enc["labels"])
    assert len(target) == 10 and target[-1] == tok.eos_token_id and enc["truncated"] is False


# ----------------------------------------------------------------------------------------- stage


def _data_handle(tmp_path: Path, n_long: int = 0, fp: str = "data-fp", huge_aspect: bool = False) -> Handle:
    """A data-stage folder as the data stage writes it: dataset/ with train and test splits."""
    import datasets

    def rows(n: int, split: str) -> list[dict]:
        return [{"input": f"{split} text {i} " + ("filler " * 300 if i < n_long else ""), "target": f"t {i}",
                 "references": [f"t {i}", "other"], "id": f"{split}-{i}",
                 "aspect": "x " * 200 if huge_aspect and i == 0 else "outcome"} for i in range(n)]

    path = tmp_path / "data"
    splits = {"train": rows(8, "train"), "validation": rows(4, "validation"), "test": rows(4, "test")}
    datasets.DatasetDict({k: datasets.Dataset.from_list([{**r, "cluster": r["input"]} for r in v])
                          for k, v in splits.items()}).save_to_disk(str(path / "dataset"))
    return Handle(stage="data", path=str(path), fingerprint=fp)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_stage_writes_arrow_and_stats_and_reuses_its_folder(tmp_path, gpt2_tokenizer_dir, tok, caplog):
    import datasets

    data = _data_handle(tmp_path, n_long=3)
    data_files = _files(Path(data.path))
    cfg = template(max_length=96, max_target_length=16)
    with caplog.at_level(logging.INFO, logger="loraflow"):
        h = tokenize_data(data, cfg, gpt2_tokenizer_dir, tmp_path / "out")
    assert h.stage == "tokenize" and Path(h.path) == (tmp_path / "out" / "tokenize" / h.fingerprint).resolve()
    assert is_complete(h.path) and "3 with the input cut" in caplog.text
    assert _files(Path(data.path)) == data_files  # no cache files written into the data stage's folder

    ds = datasets.load_from_disk(str(Path(h.path) / "dataset"))
    assert ds["train"].column_names == ["input_ids", "labels"] and len(ds["train"]) == 8
    assert ds["test"].column_names == ds["validation"].column_names == [
        "input_ids", "labels", "prompt_ids", "references", "input", "target", "cluster", "id", "aspect"]
    first = ds["test"][1]
    assert first["input_ids"] == encode_example(_data_row(first), cfg, tok)["input_ids"]
    assert first["prompt_ids"] == encode_example(_data_row(first), cfg, tok)["prompt_ids"]
    assert first["references"] == ["t 1", "other"]
    assert all(len(x) <= 96 for x in ds["train"]["input_ids"])

    stats = json.loads((Path(h.path) / "stats.json").read_text())
    assert stats["train"]["truncated"] == 3 and stats["test"]["truncated"] == 3
    assert stats["train"]["n"] == 8 and stats["train"]["dropped"] == 0
    assert stats["train"]["label_tokens"] == sum(len(completion(x)) for x in ds["train"]["labels"])
    assert h.info == {"n_train": 8, "truncated_train": 3, "dropped_train": 0,
                      "n_validation": 4, "truncated_validation": 3, "dropped_validation": 0,
                      "n_test": 4, "truncated_test": 3, "dropped_test": 0}

    mtime = (Path(h.path) / "manifest.json").stat().st_mtime_ns
    again = tokenize_data(data, cfg, gpt2_tokenizer_dir, tmp_path / "out")
    assert again == h and (Path(h.path) / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten

    other = tokenize_data(data, template(max_length=96, max_target_length=16).model_copy(
        update={"template": "Summary of {input}:"}), gpt2_tokenizer_dir, tmp_path / "out")
    assert other.fingerprint != h.fingerprint and other.info["truncated_train"] == 3
    assert len(list((tmp_path / "out" / "tokenize").iterdir())) == 2


def _data_row(test_row: dict) -> dict:
    return {k: test_row[k] for k in ("input", "target", "references", "cluster", "id", "aspect")}


def test_tokenizer_files_are_part_of_the_key(tmp_path, gpt2_tokenizer_dir):
    from loraflow.store.sources import source_identity

    copy = Path(shutil.copytree(gpt2_tokenizer_dir, tmp_path / "tok"))
    assert "tokenizer.json" in tokenizer_digest(copy)
    before = source_identity(str(copy))  # what the tokenize key holds for a model folder
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with_template = source_identity(str(copy))
    (copy / "merges.txt").write_text("#version: 0.2\n")  # vocab/merges files count too
    assert before != with_template != source_identity(str(copy))


def test_rows_that_cannot_fit_are_dropped_and_counted(tmp_path, gpt2_tokenizer_dir):
    data = _data_handle(tmp_path, huge_aspect=True)  # row 0 of each split: the {aspect} alone exceeds the budget
    h = tokenize_data(data, template(max_length=96, max_target_length=16), gpt2_tokenizer_dir, tmp_path / "out")
    assert (h.info["n_train"], h.info["dropped_train"], h.info["n_test"], h.info["dropped_test"]) == (7, 1, 3, 1)
    assert (h.info["n_validation"], h.info["dropped_validation"]) == (3, 1)


def test_stage_fails_in_one_line_when_nothing_fits(tmp_path, gpt2_tokenizer_dir):
    cfg = PromptConfig(style="template", template="x " * 40 + "{input}", max_length=32, max_target_length=8)
    with pytest.raises(PromptError, match="none of the 8 train examples fits.*raise prompt.max_length") as err:
        tokenize_data(_data_handle(tmp_path), cfg, gpt2_tokenizer_dir, tmp_path / "out")
    assert "\n" not in str(err.value) and "takes 41 tokens" in str(err.value)
    assert not (tmp_path / "out" / "tokenize").exists() or not any((tmp_path / "out" / "tokenize").iterdir())


def test_the_stage_asked_of_the_early_training_process_writes_what_it_writes_here_and_raises_its_errors(
        tmp_path, gpt2_tokenizer_dir):
    """The flow's tokenize task, when the run started its training process early, runs the stage there
    (`launch.ask`: the flow process then never imports torch before training). Same files, same summary; the
    stage's own error is raised here as that error, and the process goes on waiting for training."""
    import datasets

    from loraflow.config import ModelConfig, build_config
    from loraflow.hardware import resolve
    from loraflow.stages import tokenize
    from loraflow.stages import launch

    data, prompt = _data_handle(tmp_path, n_long=3), template(max_length=96, max_target_length=16)
    model = ModelConfig(name_or_path=str(gpt2_tokenizer_dir))
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()

    def request(out: Path, config: PromptConfig) -> dict:
        return {"data": data.model_dump(), "prompt": config.model_dump(mode="json"),
                "model": model.model_dump(mode="json"), "out": str(out), "cache_dir": None}

    cfg = resolve(build_config({"model": {"name_or_path": str(gpt2_tokenizer_dir)},
                                "run": {"output_dir": str(tmp_path / "runs")}}))
    nothing_fits = PromptConfig(style="template", template="x " * 40 + "{input}", max_length=32, max_target_length=8)
    with launch.early_start(cfg, tmp_path / "runs", "a-train-key") as early:
        assert early == "a-train-key" and launch.ask(None, "tokenize", request(here, prompt)) is None
        summary = launch.ask(early, "tokenize", request(there, prompt))
        with pytest.raises(PromptError, match="none of the 8 train examples fits.*raise prompt.max_length"):
            launch.ask(early, "tokenize", request(tmp_path / "never", nothing_fits))
        assert launch._EARLY[early].poll() is None
    assert summary == tokenize.run(data, prompt, model, here)
    ours, theirs = (datasets.load_from_disk(str(folder / "dataset")) for folder in (here, there))
    assert all(ours[split].to_list() == theirs[split].to_list() for split in ("train", "validation", "test"))


def test_the_process_started_before_the_run_is_adopted_with_the_runs_token_and_runs_its_stages(
        tmp_path, gpt2_tokenizer_dir, monkeypatch):
    """`loraflow run` starts the training process before the flow (`launch.prestart`); the run adopts it, handing
    it what changed in the environment since (the hub token the flow reads from a Prefect Secret), on its stdin.
    A change that could not reach what it already imported starts a new process instead; a run that will not
    train ends it."""
    from loraflow.config import ModelConfig, build_config
    from loraflow.hardware import resolve
    from loraflow.stages import launch, tokenize

    data, prompt = _data_handle(tmp_path), template(max_length=96, max_target_length=16)
    model = ModelConfig(name_or_path=str(gpt2_tokenizer_dir))
    cfg = resolve(build_config({"model": {"name_or_path": str(gpt2_tokenizer_dir)},
                                "run": {"output_dir": str(tmp_path / "runs")}}))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    launch.prestart(cfg)
    (prestarted, _), = launch._PRESTARTED
    monkeypatch.setenv("HF_TOKEN", "hf_from_a_secret_block")  # what `load_hub_token` does inside the run
    written: list[bytes] = []
    write = prestarted.stdin.write
    monkeypatch.setattr(prestarted.stdin, "write", lambda b: written.append(b) or write(b), raising=False)
    with launch.early_start(cfg, tmp_path / "runs", "a-train-key") as early:
        assert launch._EARLY[early] is prestarted and not launch._PRESTARTED  # adopted, not a second process
        summary = launch.ask(early, "tokenize", {"data": data.model_dump(), "prompt": prompt.model_dump(mode="json"),
                                                 "model": model.model_dump(mode="json"), "out": str(tmp_path / "there"),
                                                 "cache_dir": None})
    here = tmp_path / "here"
    here.mkdir()
    assert summary == tokenize.run(data, prompt, model, here)
    env_line = json.loads(written[0].decode().removeprefix("env "))
    assert env_line == {"set": {"HF_TOKEN": "hf_from_a_secret_block"}, "unset": []}
    assert prestarted.poll() is not None

    launch.prestart(cfg)
    (prestarted, _), = launch._PRESTARTED
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch read it at import: only a new process gets it
    with launch.early_start(cfg, tmp_path / "runs", "another-train-key") as early:
        assert launch._EARLY[early] is not prestarted and prestarted.wait(timeout=30) is not None
    launch.prestart(cfg)
    (prestarted, _), = launch._PRESTARTED
    with launch.early_start(cfg, tmp_path / "runs", None) as early:  # training will not run (a cache hit)
        assert early is None and not launch._PRESTARTED and prestarted.wait(timeout=30) is not None


def test_the_training_process_takes_the_runs_environment_from_its_stdin(monkeypatch):
    """The other half: `worker._serve` applies an env line before any stage it is asked."""
    import io
    import os

    from loraflow.stages import worker

    monkeypatch.setenv("LORAFLOW_TEST_GONE", "x")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    line = "env " + json.dumps({"set": {"HF_TOKEN": "hf_from_a_secret_block"}, "unset": ["LORAFLOW_TEST_GONE"]})
    monkeypatch.setattr("sys.stdin", io.StringIO(line + "\n"))
    assert worker._serve({}) is None  # stdin closed after it: the run ended before training
    assert os.environ["HF_TOKEN"] == "hf_from_a_secret_block" and "LORAFLOW_TEST_GONE" not in os.environ


@pytest.mark.parametrize(("cfg", "match"), [
    (PromptConfig(style="template", template="{title}: {input}"), r"uses \{title\}.*use one of \{input\}, \{id\}"),
    (PromptConfig(style="template", max_length=64, max_target_length=64), "leaves no room for the prompt"),
])
def test_stage_rejects_bad_prompt_settings_before_writing(tmp_path, gpt2_tokenizer_dir, cfg, match):
    with pytest.raises(PromptError, match=match):
        tokenize_data(_data_handle(tmp_path), cfg, gpt2_tokenizer_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenize").exists() or not any((tmp_path / "out" / "tokenize").iterdir())


def test_a_tokenizer_is_lent_to_one_caller_at_a_time_and_reloaded_when_its_files_change(tmp_path, gpt2_tokenizer_dir,
                                                                                      tokenizer_loads):
    """A cold run's pre-flight, tokenize and train stages run in threads of one training process and share one
    tokenizer, never at the same time (a fast tokenizer is not safe in two threads at once)."""
    import threading

    from loraflow.stages.tokenize import hand_back_tokenizer, take_tokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(gpt2_tokenizer_dir, folder)
    first = take_tokenizer(folder)
    second = take_tokenizer(folder)  # the first is still out: another is loaded
    assert second is not first and len(tokenizer_loads) == 2
    hand_back_tokenizer(first)
    got: list = []
    taker = threading.Thread(target=lambda: got.append(take_tokenizer(folder)))  # another thread takes it
    taker.start()
    taker.join()
    assert got == [first] and len(tokenizer_loads) == 2
    assert take_tokenizer(folder) is not first and len(tokenizer_loads) == 3  # out again: not lent twice
    hand_back_tokenizer(first)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    changed = take_tokenizer(folder)  # a tokenizer of the old files is not lent for the new ones
    assert changed is not first and changed.model_max_length == 77 and len(tokenizer_loads) == 4
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 78}))
    hand_back_tokenizer(changed)  # its files changed while it was out: it is kept for the files it was taken for
    again = take_tokenizer(folder)
    assert again is not changed and again.model_max_length == 78 and len(tokenizer_loads) == 5


def test_the_stage_hands_its_tokenizer_back_for_the_next_stage(tmp_path, gpt2_tokenizer_dir, tokenizer_loads):
    from loraflow.stages.tokenize import take_tokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(gpt2_tokenizer_dir, folder)
    tokenize_data(_data_handle(tmp_path), template(max_length=96, max_target_length=16), folder, tmp_path / "out")
    assert len(tokenizer_loads) == 1
    take_tokenizer(folder)  # what the train stage does next in the same process
    assert len(tokenizer_loads) == 1
