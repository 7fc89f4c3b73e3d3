"""Cache keys cover what determines a stage's output; a miss says what changed."""

from __future__ import annotations

from loraflow.artifacts import Handle
from loraflow.config import PipelineConfig, RunConfig, build_config
from tasks.caching import StageSpec, explain_miss

SPEC = StageSpec("train", ("loraflow.training",), sections=("train",))


def params(cfg: PipelineConfig, fp: str = "abc") -> dict:
    return {"cfg": cfg, "tokenized": Handle(stage="tokenize", path="/x", fingerprint=fp)}


def test_key_depends_on_its_sections_and_upstream_only(tmp_path):
    base = build_config({"run": {"output_dir": str(tmp_path)}})
    key = SPEC.key(None, params(base))
    assert SPEC.key(None, params(base)) == key
    other_eval = base.model_copy(update={"eval": base.eval.model_copy(update={"max_new_tokens": 3})})
    assert SPEC.key(None, params(other_eval)) == key
    other_lr = base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 1e-5})})
    assert SPEC.key(None, params(other_lr)) != key
    assert SPEC.key(None, params(base, fp="def")) != key
    moved = base.model_copy(update={"run": RunConfig(output_dir=str(tmp_path / "elsewhere"))})
    assert SPEC.key(None, params(moved)) != key


def test_miss_explains_what_changed(tmp_path):
    base = build_config({"run": {"output_dir": str(tmp_path)}})
    assert explain_miss(SPEC, params(base), tmp_path) == "no earlier run in this output folder"
    lr = base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 1e-5})})
    assert explain_miss(SPEC, params(lr), tmp_path) == "train.learning_rate changed"
    assert explain_miss(SPEC, params(lr, fp="new"), tmp_path) == "upstream tokenized changed"
    assert "same inputs" in explain_miss(SPEC, params(lr, fp="new"), tmp_path)


def test_a_refreshed_stage_says_why_it_ran(tmp_path):
    from loraflow.config import DataConfig, RunConfig
    from tasks.caching import explain_miss
    from tasks.stages import DATA

    params = {"data": DataConfig(source=str(tmp_path / "d.jsonl")), "run": RunConfig(output_dir=str(tmp_path))}
    (tmp_path / "d.jsonl").write_text('{"input": "a", "target": "b"}\n')
    assert explain_miss(DATA, params, tmp_path) == "no earlier run in this output folder"
    assert "result storage was cleared" in explain_miss(DATA, params, tmp_path)
    params["run"] = RunConfig(output_dir=str(tmp_path), refresh=["data"])
    assert explain_miss(DATA, params, tmp_path) == "refresh requested (run.refresh): recomputing"


def test_a_big_file_is_hashed_once_per_machine_not_once_per_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(8 << 20))
    code = ("import sys; from loraflow.artifacts import content_digest; "
            "io = lambda: int(open('/proc/self/io').read().split('rchar: ')[1].split()[0]); "
            "before = io(); d = content_digest(sys.argv[1]); print(d, io() - before)")
    env = {**os.environ, "LORAFLOW_CACHE": str(tmp_path / "cache")}
    repo = Path(__file__).resolve().parents[1]

    def run() -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", code, str(model)], cwd=repo, env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], int(out[1])

    first, read_first = run()
    second, read_second = run()
    assert first == second and read_first >= 8 << 20 and read_second < 1 << 20  # the bytes are read once
    (model / "model.safetensors").write_bytes(os.urandom(8 << 20))  # edited in place: a new digest
    assert run()[0] != first


def test_editing_a_stages_code_invalidates_that_stage_and_what_follows_only(tmp_path, gpt2_tokenizer_dir, monkeypatch):
    # Both keys move together: the folder's fingerprint and Prefect's cache key (tasks.caching).
    import loraflow.codehash as codehash
    from loraflow.config import DataConfig, ModelConfig, PromptConfig, RunConfig
    from loraflow.data import prepare_data
    from loraflow.tokenization import tokenize_data
    from tasks.stages import DATA, TOKENIZE

    (tmp_path / "d.jsonl").write_text("".join(f'{{"input": "text {i}", "target": "t {i}"}}\n' for i in range(30)))
    data_cfg, prompt = DataConfig(source=str(tmp_path / "d.jsonl")), PromptConfig(style="template", template="{input}")
    run = RunConfig(output_dir=str(tmp_path / "out"))
    data = prepare_data(data_cfg, tmp_path / "out")
    tokens = tokenize_data(data, prompt, gpt2_tokenizer_dir, tmp_path / "out")

    def prefect_keys() -> tuple[str, str]:
        model = ModelConfig(name_or_path=str(gpt2_tokenizer_dir))
        return (DATA.key(None, {"data": data_cfg, "run": run}),
                TOKENIZE.key(None, {"data": data, "prompt": prompt, "model": model, "run": run}))

    keys = prefect_keys()
    real_hash, real_versions = codehash.module_source_hash, codehash.library_versions()

    def edited(*modules: str) -> str:  # as if loraflow/tokenization.py had been edited
        return real_hash(*modules) + ("-edited" if "loraflow.tokenization" in modules else "")

    monkeypatch.setattr(codehash, "module_source_hash", edited)
    assert prepare_data(data_cfg, tmp_path / "out").fingerprint == data.fingerprint  # upstream: untouched
    assert tokenize_data(data, prompt, gpt2_tokenizer_dir, tmp_path / "out").fingerprint != tokens.fingerprint
    assert prefect_keys()[0] == keys[0] and prefect_keys()[1] != keys[1]
    # (downstream stages key on the tokenize fingerprint, so they miss too)
    monkeypatch.setattr(codehash, "library_versions", lambda: {**real_versions, "transformers": "9.9.9"})
    assert prepare_data(data_cfg, tmp_path / "out").fingerprint != data.fingerprint  # a library upgrade
    assert prefect_keys()[0] != keys[0]
