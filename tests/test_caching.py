"""One key per stage (`loraflow.store`): it names the folder and Prefect's cache key; a miss says what changed."""

from __future__ import annotations

from pathlib import Path


from loraflow import store
from loraflow.hardware import resolve
from loraflow.store.artifacts import Handle
from loraflow.config import DataConfig, ModelConfig, PipelineConfig, PromptConfig, RunConfig, build_config
from tasks.caching import cache_key_fn, explain_miss

UP = {"tokenized": Handle(stage="tokenize", path="/x", fingerprint="abc"),
      "model": Handle(stage="model", path="/y", fingerprint="def")}


def train_params(cfg: PipelineConfig, tokenized: str = "abc") -> dict:
    """The train task's arguments, its key among them (the run computes it once: `store.chain`)."""
    return {"cfg": cfg, **UP, "tokenized": Handle(stage="tokenize", path="/x", fingerprint=tokenized),
            "key": store.train_key(resolve(cfg), tokenized, UP["model"].fingerprint)}


def with_train(cfg: PipelineConfig, **fields) -> PipelineConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=fields)})


def test_the_train_key_holds_what_shapes_the_result_and_nothing_else(tmp_path):
    base = build_config({"run": {"output_dir": str(tmp_path)}})
    key = train_params(base)["key"].key
    assert train_params(base)["key"].key == key
    assert train_params(base.model_copy(update={"eval": base.eval.model_copy(
        update={"max_new_tokens": 3})}))["key"].key == key  # another stage's section
    # run-only fields: how the run is watched, not what it computes
    assert train_params(with_train(base, logging_steps=1, save_total_limit=9, report_to=[],
                                   dataloader_num_workers=2, save_steps=7))["key"].key == key
    assert train_params(with_train(base, learning_rate=1e-5))["key"].key != key
    assert train_params(base, tokenized="new")["key"].key != key
    # save_steps decides the result once the best checkpoint is loaded at the end
    best = with_train(base, load_best_model_at_end=True, eval_steps=5, save_steps=5)
    assert train_params(best)["key"].key != train_params(
        with_train(best, save_steps=10, eval_steps=10))["key"].key
    # Prefect's key is the folder's address: the stage, its key, the output folder
    prefect = cache_key_fn("train")(None, train_params(base))
    assert prefect.startswith(f"loraflow-train-{key}-")
    moved = base.model_copy(update={"run": RunConfig(output_dir=str(tmp_path / "elsewhere"))})
    assert train_params(moved)["key"].key == key != cache_key_fn("train")(None, train_params(moved))


def test_the_folder_is_named_by_the_key_prefect_caches_under(tmp_path, gpt2_tokenizer_dir):
    from tests_support import prepare_data, tokenize_data

    (tmp_path / "d.jsonl").write_text("".join(f'{{"input": "text {i}", "target": "t {i}"}}\n' for i in range(30)))
    data_cfg, prompt = DataConfig(source=str(tmp_path / "d.jsonl")), PromptConfig(style="template", template="{input}")
    run = RunConfig(output_dir=str(tmp_path / "out"))
    data = prepare_data(data_cfg, tmp_path / "out")
    model = ModelConfig(name_or_path=str(gpt2_tokenizer_dir))
    tokens = tokenize_data(data, prompt, model, tmp_path / "out")
    from loraflow.store.sources import source_identity

    keys = {"data": store.data_key(data_cfg),
            "tokenize": store.tokenize_key(data.fingerprint, prompt, source_identity(model.name_or_path))}
    for handle, args in ((data, {"data": data_cfg, "run": run, "key": keys["data"]}),
                         (tokens, {"data": data, "prompt": prompt, "model": model, "run": run, "key": keys["tokenize"]})):
        key = args["key"].key
        assert handle.fingerprint == key == Path(handle.path).name
        assert Path(handle.path) == store.folder(run.output_dir, handle.stage, key)
        assert cache_key_fn(handle.stage)(None, args) == store.prefect_key(handle.stage, key, run.output_dir)
    # a tokenizer given as a folder or as the model config that names it: one key, one folder
    assert tokenize_data(data, prompt, gpt2_tokenizer_dir, tmp_path / "out").path == tokens.path


def test_a_miss_names_what_differs_from_the_nearest_earlier_key(tmp_path):
    base = build_config({"run": {"output_dir": str(tmp_path)}})
    params = train_params(base)
    assert explain_miss("train", params, str(tmp_path)).endswith("no earlier run in this output folder")
    store.remember(tmp_path, params["key"])
    lr = train_params(with_train(base, learning_rate=1e-5))
    assert "train.train.learning_rate changed" not in explain_miss("train", lr, str(tmp_path))
    assert explain_miss("train", lr, str(tmp_path)).split(": ", 1)[1].startswith("train.learning_rate changed")
    store.remember(tmp_path, lr["key"])
    both = train_params(with_train(base, learning_rate=1e-5, warmup_steps=3), tokenized="new")
    why = explain_miss("train", both, str(tmp_path))  # nearest: the lr run (two fields differ, not three)
    assert "train.warmup_steps" in why and "upstream tokenize" in why and "learning_rate" not in why
    assert "made before, but its folder is gone" in explain_miss("train", lr, str(tmp_path))
    refreshed = train_params(base.model_copy(update={"run": RunConfig(output_dir=str(tmp_path), refresh=["train"])}))
    assert "refresh requested (run.refresh)" in explain_miss("train", refreshed, str(tmp_path))


def test_a_big_file_is_hashed_once_per_machine_not_once_per_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(8 << 20))
    code = ("import sys; from loraflow.store.artifacts import content_digest; "
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
    import loraflow.store.codehash as codehash
    from tests_support import prepare_data, tokenize_data

    (tmp_path / "d.jsonl").write_text("".join(f'{{"input": "text {i}", "target": "t {i}"}}\n' for i in range(30)))
    data_cfg, prompt = DataConfig(source=str(tmp_path / "d.jsonl")), PromptConfig(style="template", template="{input}")
    data = prepare_data(data_cfg, tmp_path / "out")
    tokens = tokenize_data(data, prompt, gpt2_tokenizer_dir, tmp_path / "out")
    real_hash, real_versions = codehash.module_source_hash, codehash.library_versions()

    def edited(*modules: str) -> str:  # as if loraflow/stages/tokenize.py had been edited
        return real_hash(*modules) + ("-edited" if "loraflow.stages.tokenize" in modules else "")

    monkeypatch.setattr(codehash, "module_source_hash", edited)
    assert prepare_data(data_cfg, tmp_path / "out").fingerprint == data.fingerprint  # upstream: untouched
    retokenized = tokenize_data(data, prompt, gpt2_tokenizer_dir, tmp_path / "out")
    assert retokenized.fingerprint != tokens.fingerprint and Path(retokenized.path).is_dir()
    # (downstream stages key on the tokenize key, so they miss too)
    monkeypatch.setattr(codehash, "library_versions", lambda extra=(): {**real_versions, "transformers": "9.9.9"})
    assert prepare_data(data_cfg, tmp_path / "out").fingerprint != data.fingerprint  # a library upgrade


def test_a_hub_source_is_keyed_by_its_commit(tmp_path, monkeypatch):
    """The hub is unreachable here: the commit comes from the local Hugging Face cache's snapshot refs."""
    import huggingface_hub.constants as hub

    import loraflow.store.sources as sources
    from loraflow.store.sources import source_fingerprint

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_COMMITS", {})
    ref = tmp_path / "hub" / "models--acme--tiny" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert sources.source_identity("acme/tiny") == f"acme/tiny@{'a' * 40}"
    ref.write_text("b" * 40)  # the branch moved (a later `snapshot_download`): a new key in a new process
    monkeypatch.setattr(sources, "_COMMITS", {})
    assert sources.source_identity("acme/tiny") == f"acme/tiny@{'b' * 40}"
    assert sources.source_identity("acme/tiny", "c" * 40) == f"acme/tiny@{'c' * 40}"  # a pinned commit is itself
    assert sources.source_identity("acme/none", "v1") == "acme/none@v1"  # nothing known: the revision's name
    dref = tmp_path / "hub" / "datasets--acme--papers" / "refs" / "main"
    dref.parent.mkdir(parents=True)
    dref.write_text("d" * 40)
    assert source_fingerprint(DataConfig(source="acme/papers")).endswith("@" + "d" * 40)




def test_threads_of_one_process_mark_the_same_key_used_at_once(tmp_path):
    """A sweep runs its child flows in threads of one process: their record writes must not share a temporary
    file. (Before: named by the pid alone, so one thread's rename took the other's file away.)"""
    import threading

    from loraflow.store.artifacts import ensure_writable

    sk = store.StageKey("data", {"x": 1})
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(300):
                store.remember(tmp_path, sk)
                ensure_writable(tmp_path / "out")
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert store.read_records(tmp_path, "data")[0]["key"] == sk.key
    assert not [p for p in (tmp_path / ".store" / "data").iterdir() if p.name.startswith(".")]
