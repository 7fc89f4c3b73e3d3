"""The data stage on real files: sources, column mapping, deterministic splits and caps, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.store.artifacts import is_complete
from loraflow.config import DataConfig
from loraflow.stages.data import DataError, load_split
from tests_support import prepare_data
from loraflow.store.sources import source_fingerprint

REPO = Path(__file__).resolve().parents[1]
SCITLDR = REPO / ".." / "shared" / "data" / "scitldr"  # shared, read-only: never copied into the repo
needs_scitldr = pytest.mark.skipif(
    not (SCITLDR / "train.jsonl").is_file(), reason=f"SciTLDR not found at {SCITLDR.resolve()} (shared data folder absent)"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "doc": f"document number {i}", "summary": f"summary {i}", "topic": f"t{i % 3}", "n": i}
            for i in range(start, start + n)]


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **{"input_column": "doc", "target_column": "summary", **kw})


def ids(handle, split: str) -> list[str]:
    return load_split(handle, split)["id"]


def sizes(handle) -> tuple[int, int, int]:
    return handle.info["n_train"], handle.info["n_validation"], handle.info["n_test"]


def assert_partition(handle, expected: set[str]) -> None:
    """train, validation and test are disjoint and together hold every row."""
    parts = [set(ids(handle, split)) for split in ("train", "validation", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == expected


def test_import_is_cheap():
    code = "import sys, loraflow.stages.data, loraflow.store.aclsum; print([m for m in ('datasets', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ splits and caps


def test_split_is_deterministic_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(400))
    a = prepare_data(cfg(src, seed=1, test_size=0.2), tmp_path / "a")
    b = prepare_data(cfg(src, seed=1, test_size=0.2), tmp_path / "b")
    c = prepare_data(cfg(src, seed=2, test_size=0.2), tmp_path / "c")
    assert ids(a, "test") == ids(b, "test") and ids(a, "validation") == ids(b, "validation")
    assert set(ids(a, "test")) != set(ids(c, "test"))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert_partition(a, {f"r{i}" for i in range(400)})
    n_train, n_val, n_test = sizes(a)
    assert 50 <= n_test <= 110  # hash < 0.2 of 400 rows: 80 expected, sd 8
    assert 20 <= n_val <= 50  # hash < 0.1 of the ~320 rest: 32 expected, sd 5.4
    splits = json.loads((Path(a.path) / "splits.json").read_text())
    assert splits == {"train": "pool", "test": "pool (hash < 0.2, seed 1, by input)",
                      "validation": "pool (hash < 0.1, seed 1, by input)"}


def test_a_row_keeps_its_split_as_the_pool_grows(tmp_path):
    # Retraining re-splits a growing pool: a row the champion trained on must never land in the new
    # validation or test split (it would be scored on its own training data), and vice versa.
    small = prepare_data(cfg(write_jsonl(tmp_path / "small.jsonl", rows(150))), tmp_path / "a")
    grown = prepare_data(cfg(write_jsonl(tmp_path / "grown.jsonl", rows(450))), tmp_path / "b")
    for split in ("train", "validation", "test"):
        old = set(ids(small, split))
        assert old <= set(ids(grown, split)), split
    assert_partition(grown, {f"r{i}" for i in range(450)})


def test_rows_of_one_cluster_share_a_split(tmp_path):
    # Three targets per document (as aclsum's aspects): the document never straddles train and test.
    data = [{"id": f"r{i}-{k}", "doc": f"document {i}", "summary": f"summary {i} {k}"} for i in range(60) for k in range(3)]
    h = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", data), test_size=0.3), tmp_path / "out")
    where = {}
    for split in ("train", "validation", "test"):
        for row in load_split(h, split):
            where.setdefault(row["cluster"], set()).add(split)
    assert len(where) == 60 and all(len(splits) == 1 for splits in where.values())
    assert sizes(h)[2] % 3 == 0
    by_topic = prepare_data(cfg(write_jsonl(tmp_path / "t.jsonl", rows(60)), cluster_column="topic"), tmp_path / "t")
    assert all(set(load_split(by_topic, s)["topic"]) for s in ("train", "validation", "test"))
    topics = [set(load_split(by_topic, s)["topic"]) for s in ("train", "validation", "test")]
    assert sum(len(t) for t in topics) == 3  # three topics, each wholly in one split


def test_caps_are_seeded_samples_and_nested(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(60))
    h7 = prepare_data(cfg(src, max_train_samples=7, max_eval_samples=3, validation_size=10), tmp_path)
    again = prepare_data(cfg(src, max_train_samples=7, max_eval_samples=3, validation_size=10), tmp_path / "again")
    h20 = prepare_data(cfg(src, max_train_samples=20, validation_size=10), tmp_path)
    other = prepare_data(cfg(src, max_train_samples=7, seed=5, validation_size=10), tmp_path)
    full = prepare_data(cfg(src, validation_size=10), tmp_path)
    assert sizes(h7) == (7, 10, 3)  # a count of validation rows: exactly that many
    assert ids(h7, "train") == ids(again, "train") and ids(h7, "test") == ids(again, "test")
    assert ids(h20, "train")[:7] == ids(h7, "train")  # a smaller cap is a prefix of a larger one
    assert set(ids(h7, "train")) <= set(ids(full, "train")) and set(ids(h7, "test")) <= set(ids(full, "test"))
    assert ids(h7, "train") != ids(full, "train")[:7]  # a sample, not the head of the file
    assert ids(other, "train") != ids(h7, "train")
    assert prepare_data(cfg(src, max_eval_samples=500, validation_size=10), tmp_path).info["n_test"] == full.info["n_test"]


def test_validation_cap_returns_carved_rows_to_training(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(300))
    uncapped = prepare_data(cfg(src, validation_size=0.3, max_validation_samples=None), tmp_path)
    capped = prepare_data(cfg(src, validation_size=0.3, max_validation_samples=20), tmp_path)
    assert capped.info["n_validation"] == 20 < uncapped.info["n_validation"]
    assert set(ids(capped, "validation")) < set(ids(uncapped, "validation"))
    assert capped.info["n_train"] == uncapped.info["n_train"] + uncapped.info["n_validation"] - 20
    assert ids(capped, "test") == ids(uncapped, "test")  # never touched by the validation policy


def test_multi_reference_all_trains_on_every_reference(tmp_path):
    data = [{"id": f"r{i}", "doc": f"document {i}", "summary": [f"first {i}", f"second {i}"]} for i in range(40)]
    src = write_jsonl(tmp_path / "d.jsonl", data)
    first = prepare_data(cfg(src), tmp_path)
    every = prepare_data(cfg(src, multi_reference="all"), tmp_path)
    assert every.info["n_train"] == 2 * first.info["n_train"]
    targets = sorted(load_split(every, "train")["target"])
    assert targets == sorted(t for r in load_split(first, "train")["references"] for t in r)
    assert load_split(every, "test")["references"] == load_split(first, "test")["references"]  # all, for scoring


def test_complete_folder_is_reused_without_recomputing(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", rows(20))
    first = prepare_data(cfg(src), tmp_path / "out")
    assert is_complete(first.path)
    assert sorted(p.name for p in Path(first.path).iterdir()) == ["dataset", "info.json", "manifest.json", "splits.json"]

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr("loraflow.stages.data.build_splits", boom)
    assert prepare_data(cfg(src), tmp_path / "out") == first
    (Path(first.path) / "info.json").write_text("{}")  # a damaged folder is not reused
    with pytest.raises(AssertionError, match="recomputed"):
        prepare_data(cfg(src), tmp_path / "out")


def test_editing_the_file_in_place_changes_the_fingerprint(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(20))
    first = prepare_data(cfg(src), tmp_path / "out")
    write_jsonl(src, rows(21))
    second = prepare_data(cfg(src), tmp_path / "out")
    assert second.fingerprint != first.fingerprint and sum(sizes(second)) == 21


# ------------------------------------------------------------------ columns


def test_columns_are_mapped_and_extra_string_columns_kept(tmp_path):
    data = [{**r, "tags": ["a"], "meta": {"k": 1}} for r in rows(20)]
    h = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", data)), tmp_path / "out")
    ds = load_split(h, "train")
    assert set(ds.column_names) == {"input", "target", "references", "cluster", "id", "topic"}  # n, tags, meta dropped
    row = next(r for r in ds if r["id"] == ds["id"][0])
    i = row["id"][1:]
    assert row == {"id": f"r{i}", "topic": f"t{int(i) % 3}", "input": f"document number {i}", "target": f"summary {i}",
                   "references": [f"summary {i}"], "cluster": f"document number {i}"}
    assert h.info == {**dict(zip(("n_train", "n_validation", "n_test"), sizes(h))),
                      "source": str(tmp_path / "d.jsonl"), "dropped": 0, "format": "columns"}
    assert sum(sizes(h)) == 20


def test_list_inputs_are_joined_and_list_targets_are_references(tmp_path):
    data = [{"src": ["First sentence.", f" Second one {i}. "], "tgt": ["", "ref a", "ref b "]} for i in range(30)]
    h = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", data), input_column="src", target_column="tgt"), tmp_path)
    row = load_split(h, "test")[0]
    assert row["input"].startswith("First sentence. Second one ")
    assert row["references"] == ["ref a", "ref b"] and row["target"] == "ref a"  # empty references skipped


def test_empty_rows_are_dropped_and_counted(tmp_path):
    data = rows(10) + [{"doc": "  ", "summary": "x"}, {"doc": "y", "summary": ""}, {"doc": "z", "summary": None}]
    h = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", data)), tmp_path)
    assert h.info["dropped"] == 3 and sum(sizes(h)) == 10


# ------------------------------------------------------------------ sources


_NETWORK: dict[int, list[str]] = {}  # thread id -> the socket events it raised, while a test listens (`_listen`)
_HOOKED: list = []  # the audit hook, once added (it cannot be removed)


def _listen(event: str, args: tuple) -> None:
    import threading

    if event.startswith("socket.") and (seen := _NETWORK.get(threading.get_ident())) is not None:
        seen.append(f"{event}{args[:2]}")


def test_reading_local_files_sends_nothing_over_the_network(tmp_path, monkeypatch):
    """`datasets.load_dataset("json", ...)` asks the hub to count a download of its json builder before reading a
    local file: a round trip per split on the way to the first step (and a DNS wait offline)."""
    import threading

    import datasets
    from loraflow.stages.data import build_splits

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as on a user's machine
    if not _HOOKED:
        sys.addaudithook(_listen)  # for the process's life: it records only while a thread is listed
        _HOOKED.append(_listen)
    seen = _NETWORK[threading.get_ident()] = []
    try:
        splits, _, _ = build_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows(30)), test_size=0.2), tmp_path / "cache")
    finally:
        _NETWORK.pop(threading.get_ident())
    assert len(splits["train"]) + len(splits["validation"]) + len(splits["test"]) == 30
    assert seen == []


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_csv_parquet_and_json_array_files(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame(rows(40))
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path),
     "json": lambda: df.to_json(path, orient="records")}[fmt]()
    h = prepare_data(cfg(path), tmp_path / "out")
    assert_partition(h, {f"r{i}" for i in range(40)})
    assert {"input", "target", "references", "id"} <= set(load_split(h, "train").column_names)


def test_folder_with_split_files_uses_its_splits(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train-00000-of-00002.jsonl", rows(6))
    write_jsonl(folder / "train-00001-of-00002.jsonl", rows(6, start=6))
    write_jsonl(folder / "test.jsonl", rows(5, start=100))
    write_jsonl(folder / "val.jsonl", rows(3, start=200))
    (folder / "README.md").write_text("not data")
    h = prepare_data(cfg(folder), tmp_path / "out")
    assert sizes(h) == (12, 3, 5)
    assert sorted(ids(h, "test")) == sorted(f"r{i}" for i in range(100, 105))
    assert sorted(ids(h, "validation")) == sorted(f"r{i}" for i in range(200, 203))


def test_folder_without_split_names_is_one_pool(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "part-a.jsonl", rows(20))
    write_jsonl(folder / "trainer-notes.jsonl", rows(20, start=20))  # "train" runs on into a word: not a split
    h = prepare_data(cfg(folder, test_size=0.25), tmp_path / "out")
    assert_partition(h, {f"r{i}" for i in range(40)})


def test_dev_split_is_validation_and_test_only_when_configured(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(40))
    write_jsonl(folder / "dev.jsonl", rows(4, start=100))
    h = prepare_data(cfg(folder), tmp_path / "out")  # dev is the validation split; test is carved from train
    assert sorted(ids(h, "validation")) == [f"r{i}" for i in range(100, 104)]
    assert all(int(i[1:]) < 100 for i in ids(h, "test")) and sum(sizes(h)) == 44
    for name in ("dev", "validation"):  # 'dev' files are the 'validation' split; either name finds them
        as_test = prepare_data(cfg(folder, test_split=name), tmp_path / "out")
        assert as_test.info["n_test"] == 4  # then validation is carved out of train, never out of test
        assert all(int(i[1:]) < 100 for i in ids(as_test, "validation"))
        assert as_test.info["n_train"] + as_test.info["n_validation"] == 40


def test_aclsum_source_uses_its_own_splits(tmp_path):
    h = prepare_data(DataConfig(source="aclsum", aclsum_aspect="outcome", max_eval_samples=10), tmp_path)
    assert (h.info["n_train"], h.info["n_test"]) == (100, 10) and h.info["n_validation"] > 0
    test = load_split(h, "test")
    assert set(test["aspect"]) == {"outcome"}
    assert set(test.column_names) == {"id", "aspect", "input", "target", "references", "cluster"}
    every = prepare_data(DataConfig(source="aclsum"), tmp_path)
    assert (every.info["n_train"], every.info["n_test"]) == (300, 300)
    test = load_split(every, "test")
    assert len(set(test["cluster"])) == 100  # three aspects per paper: 100 clusters of 3


def test_hub_ids_go_to_datasets_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        split = lambda n: datasets.Dataset.from_list([{"article": f"text {i}", "highlights": f"sum {i}"} for i in range(n)])
        return datasets.DatasetDict({"train": split(8), "validation": split(2), "test": split(3)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = DataConfig(source="acme/news", hub_config="3.0.0", revision="v1", input_column="article", target_column="highlights")
    assert source_fingerprint(c) == "acme/news:3.0.0@v1"
    h = prepare_data(c, tmp_path)
    assert calls == [("acme/news", "3.0.0", {"revision": "v1"})]
    assert (h.info["n_train"], h.info["n_test"]) == (8, 3)


def test_hub_failure_is_one_clear_line(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'acme/none' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load hub dataset 'acme/none' \(ConnectionError: Couldn't reach.*"
                                        r"no local file or folder of that name.*point data.source at a local file") as err:
        prepare_data(DataConfig(source="acme/none"), tmp_path)
    assert "\n" not in str(err.value)
    assert err.value.transient, "a network failure is worth the data task's retries"

    def missing(*a, **k):
        raise FileNotFoundError("Dataset 'acme/none' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(source="acme/none"), tmp_path)
    assert not err.value.transient, "retrying a dataset that does not exist only delays the error"


@needs_scitldr
def test_scitldr_folder_with_dev_as_test(tmp_path):
    c = DataConfig(source=str(SCITLDR), input_column="source", target_column="target", test_split="dev")
    h = prepare_data(c, tmp_path)
    assert (h.info["n_train"] + h.info["n_validation"], h.info["n_test"], h.info["dropped"]) == (1992, 619, 0)
    assert 150 <= h.info["n_validation"] <= 256  # hash < 0.1 of 1992, capped at max_validation_samples
    test = load_split(h, "test")
    refs = test["references"]
    assert max(len(r) for r in refs) > 1 and sum(len(r) for r in refs) / len(refs) > 2.0  # multi-reference dev
    row = test[0]
    assert row["target"] == row["references"][0] and isinstance(row["input"], str) and len(row["input"].split()) > 50
    assert "title" in test.column_names and "paper_id" in test.column_names  # string columns kept
    assert "source_labels" not in test.column_names  # lists of ints dropped


@needs_scitldr
def test_scitldr_single_file_is_split_by_seed(tmp_path):
    c = DataConfig(source=str(SCITLDR / "train.jsonl"), input_column="source", target_column="target", max_eval_samples=50)
    h = prepare_data(c, tmp_path)
    assert h.info["n_test"] == 50 and h.info["n_train"] + h.info["n_validation"] > 1500


# ------------------------------------------------------------------ errors


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match=r"'.*missing.jsonl' does not exist: check the path"):
        prepare_data(cfg(tmp_path / "missing.jsonl"), tmp_path)
    with pytest.raises(DataError, match=r"'./no/such/folder' does not exist"):
        prepare_data(cfg("./no/such/folder"), tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no .jsonl/.json/.csv/.parquet files"):
        prepare_data(cfg(tmp_path / "docs"), tmp_path)


def test_unknown_columns_list_the_available_ones(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(10))
    with pytest.raises(DataError, match=r"data.input_column: no column 'text'.*available columns are id, doc, summary, topic, n"):
        prepare_data(cfg(src, input_column="text"), tmp_path)
    with pytest.raises(DataError, match=r"data.target_column: no column 'abstract'"):
        prepare_data(cfg(src, target_column="abstract"), tmp_path)
    listy = write_jsonl(tmp_path / "l.jsonl", [{"doc": ["a", "b"], "summary": "s"}] * 4)
    with pytest.raises(DataError, match="holds lists of strings: set data.join_input_lists=true"):
        prepare_data(cfg(listy, join_input_lists=False), tmp_path)


def test_corrupt_and_empty_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc": "a", "summary": "b"}\n\n{"doc": "a", broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3 is not valid JSON .*fix or remove that line"):
        prepare_data(cfg(bad), tmp_path)
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('{"doc": "a", "summary": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match="list.jsonl: line 2 is a JSON list, not an object"):
        prepare_data(cfg(notobj), tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="empty.jsonl' has no rows: add examples"):
        prepare_data(cfg(tmp_path / "empty.jsonl"), tmp_path)
    (tmp_path / "header.csv").write_text("doc,summary\n")
    with pytest.raises(DataError, match="header.csv' has no rows"):
        prepare_data(cfg(tmp_path / "header.csv"), tmp_path)


def test_empty_splits(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(10))
    write_jsonl(folder / "test.jsonl", [{"doc": "", "summary": "x", "id": "", "topic": "", "n": 0}])
    with pytest.raises(DataError, match=r"all 1 rows of the test split have an empty 'doc' or 'summary': check data.input_column"):
        prepare_data(cfg(folder), tmp_path)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"doc": " ", "summary": "x"}, {"doc": "y", "summary": ""}])
    with pytest.raises(DataError, match="all 2 rows of the pool split have an empty"):
        prepare_data(cfg(blank), tmp_path)
    one = write_jsonl(tmp_path / "one.jsonl", rows(1))
    with pytest.raises(DataError, match="only 1 usable example.*need at least 2"):
        prepare_data(cfg(one), tmp_path)
    assert not list((tmp_path / "data").glob("*/dataset")) and not list(tmp_path.glob("data/.*"))  # nothing half-written


def test_ambiguous_folders(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(5))
    write_jsonl(folder / "extra.jsonl", rows(5))
    with pytest.raises(DataError, match="mixes split files .* with extra.jsonl: rename those"):
        prepare_data(cfg(folder), tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "test.jsonl", rows(5))
    write_jsonl(other / "dev.jsonl", rows(5))
    with pytest.raises(DataError, match=r"data.train_split: .* has no split 'train'; its splits are .*set data.train_split"):
        prepare_data(cfg(other), tmp_path)


def test_load_split_errors(tmp_path):
    h = prepare_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows(10))), tmp_path)
    assert len(load_split(Path(h.path), "train")) == h.info["n_train"]
    assert len(load_split(Path(h.path) / "dataset", "test")) == h.info["n_test"] >= 1
    with pytest.raises(DataError, match="has no split 'dev': use one of train, validation, test"):
        load_split(h, "dev")
    with pytest.raises(DataError, match="no data stage output at .*run the data stage first"):
        load_split(tmp_path / "nowhere", "train")


def test_split_settings_that_cannot_work_fail_in_one_line(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(40))
    with pytest.raises(DataError, match=r"data.validation_size=500 carves 3\d of the 3\d usable rows .* change "
                                        r"data.validation_size") as err:
        prepare_data(cfg(src, validation_size=500), tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"data.cluster_column: no column 'paper' .* available columns are id, doc"):
        prepare_data(cfg(src, cluster_column="paper"), tmp_path)


def test_a_data_folder_follows_links_only_within_itself(tmp_path):
    """A file in the data folder that links elsewhere (e.g. to a key file) is refused; a link within the folder is
    read. (Before: any link was followed, so a run could read any file the worker can.)"""
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "batch-1.jsonl").write_text('{"input": "a", "target": "b"}\n' * 4)
    (folder / "latest.jsonl").symlink_to(folder / "batch-1.jsonl")
    source_fingerprint(DataConfig(source=str(folder)))  # inside: fine
    secret = tmp_path / "elsewhere" / "creds.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"input": "aws_secret_access_key", "target": "x"}\n')
    (folder / "extra.jsonl").symlink_to(secret)
    with pytest.raises(DataError, match=r"^data.source: 'extra.jsonl' in '.*' is a link to .*creds.jsonl, outside the "
                                        r"data folder: copy the file into the folder"):
        source_fingerprint(DataConfig(source=str(folder)))
