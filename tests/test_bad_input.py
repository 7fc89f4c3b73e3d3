"""Bad inputs not covered beside their stage's tests: each fails early, in one line that names the fix."""

from __future__ import annotations

import os
import re
import sys

import pytest

from loraflow.store.artifacts import ensure_writable
from loraflow.config import ModelConfig, QuantizationConfig
from loraflow.stages.model import ModelError, check_bitsandbytes, load_base
from loraflow.store.sources import ModelSourceError, resolve_model_dir
from tests_support import write_examples


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"run.output_dir '.*a-file/runs' is not writable .*--set run.output_dir="):
        ensure_writable(blocker / "runs")
    assert ensure_writable(tmp_path / "new" / "runs").is_dir()


def test_four_bit_without_a_usable_bitsandbytes(monkeypatch, tiny_llama_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(ModelError, match=r"quantization.mode=nf4 needs bitsandbytes.*set quantization.mode=none"):
        check_bitsandbytes("nf4")
    with pytest.raises(ModelError, match="quantization.mode=fp4"):
        load_base(tiny_llama_dir, ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig(mode="fp4"))


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, tiny_llama_dir):
    import shutil

    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="allow_pickle_weights=true"):
        resolve_model_dir(str(folder))
    assert resolve_model_dir(str(folder), allow_pickle=True) == folder.resolve()
    assert ModelConfig().allow_pickle_weights is False and ModelConfig().trust_remote_code is False


# The catalogue, end to end: `loraflow run` on each bad input exits non-zero with one line that names
# the fix, and leaves no partial artifact (no temp folder, no stage folder without its manifest).
def _toy(tmp_path):
    return write_examples(tmp_path / "toy.jsonl", n=24)


def _corrupt(tmp_path):
    path = _toy(tmp_path)
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-5]
    path.write_text("\n".join(lines) + "\n")
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def _not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return f"model.name_or_path={path}"


CATALOGUE = {  # name: (overrides, or a function of tmp_path returning one more override; expected line)
    "missing data file": (["data.source={tmp}/nope.jsonl"], 1, r"data.source: '.*nope.jsonl' does not exist: check the path"),
    "unknown column": (["data.input_column=body"], 1, r"no column 'body' .*available columns are text, summary"),
    "empty dataset": ([_empty], 1, r"empty.jsonl' has no rows: add examples"),
    "corrupt jsonl line": ([_corrupt], 1, r"toy.jsonl: line 7 is not valid JSON .*fix or remove that line"),
    "every example too long": (["prompt.max_length=16", "prompt.max_target_length=4",
                                'prompt.template="Read the report below with care, then write a summary of it in plain words.\\n{input}\\nSummary:"'], 1, r"pre-flight: tokenize: none of the \d+ sampled training rows fits prompt.max_length=16.*raise prompt.max_length"),
    "test_size out of range": (["data.test_size=1.5"], 2, r"data.test_size: .*"),
    "target modules not found": (["lora.target_modules=[qkv]"], 1, r"lora.target_modules \['qkv'\] not found.*'q_proj'"),
    "unknown config key": (["train.learnig_rate=1e-3"], 2, r"train.learnig_rate.*did you mean 'learning_rate'"),
    "output folder not writable": (["run.output_dir={tmp}/a-file/runs"], 1, r"run.output_dir '.*' is not writable"),
    "gguf that is not a model": ([_not_a_gguf], 1, r"not a loadable GGUF"),
    "4-bit without bitsandbytes": (["quantization.mode=nf4"], 1, r"quantization.mode=nf4 needs bitsandbytes"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_fails_in_one_line_and_publishes_nothing(case, tmp_path, tiny_llama_dir, prefect_harness,
                                                          monkeypatch):
    import contextlib
    import io

    from loraflow.cli.main import main

    overrides, code, expected = CATALOGUE[case]
    (tmp_path / "a-file").write_text("blocks a folder of that name")
    data = _toy(tmp_path)
    args = [f"data.source={data}", "data.input_column=text", "data.target_column=summary",
            f"model.name_or_path={tiny_llama_dir}", "prompt.style=template", 'prompt.template="Text: {input}\\nSummary:"',
            "lora.target_modules=[q_proj,v_proj]", "train.max_steps=1", f"run.output_dir={tmp_path}/runs",
            f"run.cache_dir={tmp_path}/cache"]
    for item in overrides:
        value = str(item(tmp_path)) if callable(item) else item.replace("{tmp}", str(tmp_path))
        args.append(value if "=" in value else f"data.source={value}")
    if case == "4-bit without bitsandbytes":  # here, and in the training process (which builds the model stage)
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        broken = tmp_path / "broken" / "bitsandbytes"
        broken.mkdir(parents=True)
        (broken / "__init__.py").write_text("raise ImportError('no native library for this platform')\n")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(broken.parent), os.environ.get("PYTHONPATH")])))
    argv = ["run"]
    for a in args:
        argv += ["--set", a]

    # stderr captured around the call only (the session's Prefect server may start inside this test).
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(argv) == code
    err = stderr.getvalue().strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert re.search(expected, err[-1]), err[-1]
    runs = tmp_path / "runs"
    leftovers = [p for p in runs.rglob("*") if ".tmp-" in p.name] if runs.is_dir() else []
    assert not leftovers, leftovers
    for stage in ("data", "tokenize", "model", "train", "evaluate"):
        for folder in (runs / stage).glob("*") if (runs / stage).is_dir() else []:
            if folder.is_dir():
                assert (folder / "manifest.json").is_file(), f"{folder} was published without its manifest"
    assert not (runs / "train").exists() or not list((runs / "train").glob("*/manifest.json"))
