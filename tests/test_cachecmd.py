"""`loraflow cache ls|why|gc` on a real store: folders written by the stage functions, a real registry and lock."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from loraflow import store
from loraflow.cli import DEFAULT_CONFIG, main
from loraflow.config import load_config
from loraflow.data import prepare_data
from loraflow.tokenization import tokenize_data


@pytest.fixture
def populated(tmp_path, gpt2_tokenizer_dir, monkeypatch):
    """A run folder with one data key and two tokenize keys (two templates), made a minute apart."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.jsonl").write_text("".join(f'{{"input": "text {i}", "target": "t {i}"}}\n' for i in range(30)))
    sets = [f"data.source={tmp_path / 'd.jsonl'}", f"run.output_dir={tmp_path / 'runs'}",
            f"model.name_or_path={gpt2_tokenizer_dir}", "prompt.style=template", "prompt.template=Summarize {input}"]
    cfg = load_config(DEFAULT_CONFIG, sets)  # what the commands below read
    data = prepare_data(cfg.data, cfg.run.output_dir)
    old = tokenize_data(data, cfg.prompt.model_copy(update={"template": "Old {input}"}), cfg.model, cfg.run.output_dir)
    record = Path(cfg.run.output_dir) / ".store" / "tokenize" / f"{old.fingerprint}.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "last_used": time.time() - 3600}))  # an hour ago
    new = tokenize_data(data, cfg.prompt, cfg.model, cfg.run.output_dir)
    return {"cfg": cfg, "sets": sets, "data": data, "old": old, "new": new}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def args(populated, *extra: str) -> list[str]:
    return [a for s in populated["sets"] for a in ("--set", s)] + list(extra)


def test_ls_lists_every_stage_folder_with_size_times_and_maker(populated, capsys):
    code, out, _ = run(capsys, "cache", "ls", *args(populated))
    assert code == 0
    lines = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert set(lines) == {populated["data"].fingerprint, populated["old"].fingerprint, populated["new"].fingerprint}
    assert lines[populated["data"].fingerprint].startswith("data ") and f"pid {os.getpid()}" in out
    assert "KiB" in lines[populated["new"].fingerprint] and "incomplete" not in out


def test_why_says_hit_or_names_the_fields_that_differ(populated, capsys):
    code, out, _ = run(capsys, "cache", "why", *args(populated))
    status = {line.split()[0]: line.split(None, 2)[2] for line in out.splitlines()[1:]}
    assert code == 0 and status["data"] == "hit" and status["tokenize"] == "hit"
    assert status["model"] == "run: no earlier run in this output folder"
    code, out, _ = run(capsys, "cache", "why", *args(populated, "--set", "prompt.template=Old {input} again"))
    status = {line.split()[0]: line.split(None, 2)[2] for line in out.splitlines()[1:]}
    assert status["data"] == "hit" and status["tokenize"].startswith("run: prompt.template changed (nearest earlier key ")
    code, out, _ = run(capsys, "cache", "why", *args(populated, "--set", "run.refresh=[data]"))
    assert "data" in out and "refresh requested" in out


def test_gc_removes_the_least_recently_used_and_never_the_champion_or_a_locked_stage(populated, capsys):
    from loraflow.registry import Candidate, Registry
    from tasks.locks import AtomicFileLockManager

    cfg, old, new = populated["cfg"], populated["old"], populated["new"]
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--older-than", "30m", "--dry-run"))
    assert code == 0 and f"would remove tokenize {old.fingerprint}" in out and Path(old.path).is_dir()

    # the champion was measured on the old tokenize folder: kept
    Registry(Path(cfg.run.output_dir) / "registry").record(Candidate(
        adapter="/x", train_fingerprint="t", data_fingerprint=populated["data"].fingerprint,
        test_fingerprint=old.fingerprint, metric="rougeL", score=0.5, promoted=True, reason="test"))
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0"))
    assert f"kept tokenize {old.fingerprint}: the registry's champion" in out and Path(old.path).is_dir()
    assert f"removed tokenize {new.fingerprint}" in out and not Path(new.path).exists()
    assert not (Path(cfg.run.output_dir) / ".store" / "tokenize" / f"{new.fingerprint}.json").exists()

    # a stage a live run holds the lock of: kept; once released, removed
    (Path(cfg.run.output_dir) / "registry" / "registry.json").unlink()
    locks = AtomicFileLockManager(Path(cfg.run.output_dir) / ".locks")
    key = store.prefect_key("tokenize", old.fingerprint, cfg.run.output_dir)
    assert locks.acquire_lock(key, holder="a live run")
    try:
        code, out, _ = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0"))
        assert f"kept tokenize {old.fingerprint}: locked by a live run" in out and Path(old.path).is_dir()
    finally:
        locks.release_lock(key, holder="a live run")
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0"))
    assert f"removed tokenize {old.fingerprint}" in out and not Path(old.path).exists()


def test_gc_with_a_bad_age_fails_in_one_line_naming_the_fix(populated, capsys):
    code, out, err = run(capsys, "cache", "gc", *args(populated, "--older-than", "soon"))
    assert code == 2 and err.strip().count("\n") == 0 and "e.g. 90s, 30m, 12h, 7d" in err
    code, out, err = run(capsys, "cache", "gc", *args(populated))
    assert code == 2 and "exactly one of --older-than" in err
    assert Path(populated["old"].path).is_dir()  # nothing was removed
