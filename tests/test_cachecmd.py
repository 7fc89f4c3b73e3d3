"""`loraflow cache ls|why|gc` on a real store: folders written by the stage functions, a real registry and lock."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from loraflow import store
from loraflow.cli.main import DEFAULT_CONFIG, main
from loraflow.config import load_config
from tests_support import prepare_data, tokenize_data


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
    from loraflow.ops.registry import Candidate, Registry
    from loraflow.store.locks import AtomicFileLockManager

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


def test_gc_keeps_the_mlflow_champion_pending_approvals_exports_and_what_live_runs_read(populated, capsys, tmp_path):
    """(Before: only the JSON registry's champion and locked stages were kept.)"""
    import mlflow  # noqa: F401 - a real MLflow store (sqlite), as a tracking server keeps it
    from mlflow.tracking import MlflowClient

    from loraflow.store.artifacts import Handle
    from loraflow.ops.registry import Approval, Candidate, Registry

    cfg, old, new, data = populated["cfg"], populated["old"], populated["new"], populated["data"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = dict(adapter="/x", data_fingerprint=data.fingerprint, metric="rougeL", score=0.5, reason="test")
    registry = Registry(Path(cfg.run.output_dir) / "registry")
    aliased = registry.record(Candidate(train_fingerprint="t-mlflow", test_fingerprint=old.fingerprint, promoted=False,
                                        **common))
    pending = registry.record(Candidate(train_fingerprint="t-pending", test_fingerprint=new.fingerprint, promoted=False,
                                        approval=Approval(deadline="2999-01-01T00:00:00+00:00", timeout_hours=1),
                                        **common))
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("loraflow-demo")
    version = c.create_model_version("loraflow-demo", "/x", tags={"loraflow.candidate_id": aliased.id})
    c.set_registered_model_alias("loraflow-demo", "champion", version.version)
    # the pending challenger's evaluation and its export: folders whose records name their upstream keys
    output = Path(cfg.run.output_dir)
    evaluated = store.StageKey("evaluate", {"upstream train": "t-pending"})
    exported = store.StageKey("export", {"upstream evaluate": evaluated.key})
    for sk in (evaluated, exported):
        (output / sk.stage / sk.key).mkdir(parents=True)
        store.remember(output, sk)
    sets = ["--set", "promotion.registry=mlflow", "--set", "train.report_to=[mlflow]",
            "--set", f"run.mlflow_tracking_uri={uri}", "--set", "promotion.mlflow_model_name=loraflow-demo"]
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0", "--dry-run", *sets))
    assert code == 0, out
    assert f"kept tokenize {old.fingerprint}: the MLflow champion {aliased.id}" in out
    assert f"kept tokenize {new.fingerprint}: awaiting approval ({pending.id})" in out
    assert f"kept evaluate {evaluated.key}: awaiting approval ({pending.id})" in out
    assert f"kept export {exported.key}: awaiting approval ({pending.id})" in out

    # A live run reads the data folder: kept while it runs; the record of a run that was killed counts for nothing.
    (output / "registry" / "registry.json").unlink()
    with store.reading_run(output):
        store.reading(Handle(stage="data", path=data.path, fingerprint=data.fingerprint, info={}))
        code, out, _ = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0", "--dry-run"))
        assert f"kept data {data.fingerprint}: in use by a live run (pid {os.getpid()}" in out
    readers = output / ".store" / "readers"
    (readers / "killed.json").write_text(json.dumps({"host": os.uname().nodename, "boot_id": "", "pid": 2 ** 22,
                                                     "pid_start": "1", "stages": [["data", data.fingerprint]]}))
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0", "--dry-run"))
    assert f"would remove data {data.fingerprint}" in out and not list(readers.glob("*.json"))


def test_gc_collects_leftovers_no_stage_owns_and_ls_shows_them(populated, capsys):
    """Scratch folders of dead writers, checkpoints of runs that never finished, checkpoints a refresh set aside.
    (Before: never collected, and hidden from `cache ls`.)"""
    import subprocess
    import sys

    output = Path(populated["cfg"].run.output_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = {output / "tokenize" / f".{populated['new'].fingerprint}.tmp-{dead.pid}-0123abcd": "tmp folder",
                 output / "train" / "00aa.work": "did not finish",
                 output / "train" / "00bb.work.set-aside-1700000000": "set aside by a refresh"}
    live = output / "tokenize" / f".{populated['new'].fingerprint}.tmp-{os.getpid()}-4567cdef"
    for path in [*leftovers, live]:
        (path / "checkpoints").mkdir(parents=True)
        (path / "checkpoints" / "weights.bin").write_bytes(b"x" * 2048)
        for p in (path / "checkpoints" / "weights.bin", path / "checkpoints", path):
            os.utime(p, (time.time() - 7200, time.time() - 7200))
    code, out, _ = run(capsys, "cache", "ls", *args(populated))
    for path, what in leftovers.items():
        assert any(path.name in line and "orphan:" in line and what in line for line in out.splitlines()), out
    assert live.name not in out  # its writer runs
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--older-than", "30m", "--dry-run"))
    assert all(f"would remove {p.parent.name} {p.name} (2.0 KiB" in out for p in leftovers) and all(map(Path.exists, leftovers))
    code, out, _ = run(capsys, "cache", "gc", *args(populated, "--older-than", "30m"))
    assert code == 0 and not any(map(Path.exists, leftovers)) and live.exists()
    assert Path(populated["new"].path).is_dir()  # used just now: not old enough


def test_gc_refuses_in_one_line_when_the_mlflow_champion_cannot_be_read(populated, capsys, monkeypatch):
    """With promotion.registry=mlflow the champion lives in MLflow: no MLflow, no knowing what to keep."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = run(capsys, "cache", "gc", *args(populated, "--keep-last", "0", "--set", "promotion.registry=mlflow",
                                                       "--set", "train.report_to=[mlflow]"))
    assert code == 2 and err.strip().count("\n") == 0 and "removed" not in out
    assert err.startswith("error: cache gc: the MLflow champion cannot be read (TrackingError:")
    assert err.rstrip().endswith("start the tracking server (promotion.registry=mlflow) before collecting")
    assert Path(populated["old"].path).is_dir() and Path(populated["new"].path).is_dir()
