"""The data stage on real files: sources, column mapping, deterministic splits, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.artifacts import is_complete
from loraflow.config import DataConfig
from loraflow.data import DataError, load_split, prepare_data

SCITLDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "scitldr"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n: int) -> list[dict]:
    return [{"doc": f"document number {i}", "summary": f"summary {i}", "topic": f"t{i % 3}"} for i in range(n)]


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), input_column="doc", target_column="summary", **kw)


def test_split_is_deterministic_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(50))
    a = prepare_data(cfg(src, seed=1, test_size=0.2), tmp_path / "a")
    b = prepare_data(cfg(src, seed=1, test_size=0.2), tmp_path / "b")
    c = prepare_data(cfg(src, seed=2, test_size=0.2), tmp_path / "c")
    test_a, test_b, test_c = (load_split(h, "test")["input"] for h in (a, b, c))
    assert test_a == test_b and len(test_a) == 10
    assert test_a != test_c
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not set(test_a) & set(load_split(a, "train")["input"])


def test_columns_are_mapped_and_extra_string_columns_kept(tmp_path):
    h = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows(20))), tmp_path / "out")
    ds = load_split(h, "train")
    assert set(ds.column_names) == {"input", "target", "references", "topic"}
    row = ds[0]
    assert row["target"] == row["references"][0] and row["input"].startswith("document number")
    assert is_complete(h.path) and h.info["n_train"] + h.info["n_test"] == 20


def test_list_inputs_are_joined_and_list_targets_are_references(tmp_path):
    data = [{"src": ["First sentence.", "Second one."], "tgt": ["ref a", "ref b"]} for _ in range(10)]
    h = prepare_data(DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", data)), input_column="src", target_column="tgt"), tmp_path)
    row = load_split(h, "test")[0]
    assert row["input"] == "First sentence. Second one." and row["references"] == ["ref a", "ref b"] and row["target"] == "ref a"


def test_caps_are_deterministic_samples(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(60))
    h1 = prepare_data(cfg(src, max_train_samples=7, max_eval_samples=3), tmp_path / "x")
    h2 = prepare_data(cfg(src, max_train_samples=7, max_eval_samples=3), tmp_path / "y")
    assert h1.info["n_train"] == 7 and h1.info["n_test"] == 3
    assert load_split(h1, "train")["input"] == load_split(h2, "train")["input"]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_other_formats(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame(rows(20))
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path),
     "json": lambda: df.to_json(path, orient="records")}[fmt]()
    h = prepare_data(cfg(path), tmp_path / "out")
    assert h.info["n_train"] == 18 and h.info["n_test"] == 2


def test_folder_with_split_files_uses_its_splits(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(12))
    write_jsonl(folder / "test.jsonl", rows(5))
    h = prepare_data(cfg(folder), tmp_path / "out")
    assert (h.info["n_train"], h.info["n_test"]) == (12, 5)


def test_editing_the_file_in_place_changes_the_fingerprint(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(20))
    first = prepare_data(cfg(src), tmp_path / "out")
    write_jsonl(src, rows(21))
    assert prepare_data(cfg(src), tmp_path / "out").fingerprint != first.fingerprint


def test_aclsum_source_uses_its_own_splits(tmp_path):
    h = prepare_data(DataConfig(source="aclsum", aclsum_aspect="outcome", max_eval_samples=10), tmp_path)
    assert h.info["n_train"] == 100 and h.info["n_test"] == 10
    assert set(load_split(h, "test")["aspect"]) == {"outcome"}


@pytest.mark.skipif(not SCITLDR.is_dir(), reason=f"SciTLDR not found at {SCITLDR} (shared data folder absent)")
def test_scitldr_multi_reference_dev_split(tmp_path):
    c = DataConfig(source=str(SCITLDR), input_column="source", target_column="target", test_split="validation")
    h = prepare_data(c, tmp_path)
    assert h.info["n_train"] == 1992 and h.info["n_test"] == 619
    refs = load_split(h, "test")["references"]
    assert max(len(r) for r in refs) > 1
    assert sum(len(r) for r in refs) / len(refs) > 2.0


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist: check the path"):
        prepare_data(cfg(tmp_path / "missing.jsonl"), tmp_path)
    src = write_jsonl(tmp_path / "d.jsonl", rows(10))
    with pytest.raises(DataError, match=r"no column 'text'.*available columns are doc, summary, topic"):
        prepare_data(DataConfig(source=str(src), input_column="text", target_column="summary"), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc": "a", "summary": "b"}\n{"doc": "a", broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        prepare_data(cfg(bad), tmp_path)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"doc": " ", "summary": "x"}, {"doc": "y", "summary": ""}])
    with pytest.raises(DataError, match="usable example"):
        prepare_data(cfg(empty), tmp_path)
    assert not list(tmp_path.glob("data/*/dataset"))  # nothing half-written was left behind


def test_hub_ids_go_to_the_hub_loader_and_fail_clearly_offline(tmp_path, monkeypatch):
    from loraflow.data import is_local, source_fingerprint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    c = DataConfig(source="acme/no-such-dataset", hub_config="Abstract", revision="v1")
    assert not is_local(c.source)
    assert source_fingerprint(c) == "acme/no-such-dataset:Abstract@v1"
    with pytest.raises(DataError, match="could not load hub dataset 'acme/no-such-dataset'.*use a local file"):
        prepare_data(c, tmp_path)
