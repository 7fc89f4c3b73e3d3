"""While the flow process waits for the early training process's pre-flight, it uses its idle core: it imports what
the data stage needs, then freezes what is alive out of the cyclic collector, so that the full collection after each
stage before training (`store.build`) walks only what was made since. It unfreezes when training is over, so that a
process running many flows keeps no run's objects from the collector, and it leaves a freeze of someone else's alone.
Then it builds the splits of a data stage that will run, which the stage saves instead of building them again."""

import gc
import json
import logging

import pytest

from flows import pipeline
from loraflow.config import DataConfig
from loraflow.stages import data


def test_the_flow_process_freezes_what_is_alive_while_it_waits_and_unfreezes_after():
    assert gc.get_freeze_count() == 0
    walked_before = len(gc.get_objects())  # what a full collection walks (the frozen generation is not in it)
    with pipeline._ready_beside("a-train-key", modules=("json",)) as beside:
        beside.thread.join()
        assert beside.data_folder is None
        frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
    assert frozen > 10_000  # Prefect's, pydantic's, pytest's objects: alive in this process
    assert walked < walked_before / 10
    assert gc.get_freeze_count() == 0


def test_nothing_is_frozen_without_an_early_training_process_or_over_a_freeze_of_someone_elses():
    with pipeline._ready_beside(None) as beside:
        assert beside.thread is None and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        with pipeline._ready_beside("a-train-key", modules=("json",)) as beside:
            beside.thread.join()
            assert theirs * 0.9 < gc.get_freeze_count() <= theirs  # nothing of ours added
        assert gc.get_freeze_count() > theirs * 0.9  # still theirs (what refcounting frees leaves the count)
    finally:
        gc.unfreeze()


def _source(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(source=str(path))


def test_a_data_stage_that_will_run_gets_its_splits_built_while_the_flow_waits_and_saves_them_as_built(tmp_path, caplog):
    cfg = _source(tmp_path, [{"input": f"document {i} " * 5, "target": f"summary {i}"} for i in range(60)])
    with pipeline._ready_beside("a-train-key", cfg, modules=("json",)) as beside:
        beside.thread.join()
        scratch = data._AHEAD[cfg.model_dump_json()][1]
        assert str(scratch) == beside.data_folder and not scratch.is_relative_to(tmp_path)  # nothing in the workspace
        built, dropped, origin = data.splits_ahead(cfg, beside.data_folder)  # what the pre-flight reads
        assert data.splits_ahead(cfg.model_copy(update={"seed": cfg.seed + 1}), beside.data_folder) is None
        with caplog.at_level(logging.INFO, logger="loraflow"):
            ahead = data.run(cfg, tmp_path / "ahead")
        assert "built while the pre-flight ran" in caplog.text
        assert not scratch.exists() and cfg.model_dump_json() not in data._AHEAD
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraflow"):
        plain = data.run(cfg, tmp_path / "plain")  # nothing built ahead any more: the stage builds
    assert "built while the pre-flight ran" not in caplog.text
    assert ahead == plain
    assert (tmp_path / "ahead/splits.json").read_text() == (tmp_path / "plain/splits.json").read_text()
    for split in ("train", "validation", "test"):
        rows = data.load_split(tmp_path / "plain", split).to_dict()
        assert data.load_split(tmp_path / "ahead", split).to_dict() == rows == built[split].to_dict()
    assert json.loads((tmp_path / "plain/splits.json").read_text()) == origin and dropped == plain["dropped"]


def test_splits_no_stage_took_are_dropped_with_their_scratch_and_a_failed_build_is_the_stages_own_error(tmp_path):
    cfg = _source(tmp_path, [{"input": f"document {i}", "target": f"summary {i}"} for i in range(60)])
    with pipeline._ready_beside("a-train-key", cfg, modules=("json",)) as beside:
        beside.thread.join()
        scratch = data._AHEAD[cfg.model_dump_json()][1]
    assert not scratch.exists() and cfg.model_dump_json() not in data._AHEAD  # e.g. the data stage was a cache hit
    bad = _source(tmp_path, [{"input": f"document {i}", "summary": f"summary {i}"} for i in range(60)])
    with pytest.raises(data.DataError) as plain:
        data.run(bad, tmp_path / "plain")
    with pipeline._ready_beside("a-train-key", bad, modules=("json",)) as beside:
        beside.thread.join()
        assert data.splits_ahead(bad, beside.data_folder) is None  # the pre-flight builds, and reports the error
        with pytest.raises(data.DataError) as ahead:
            data.run(bad, tmp_path / "ahead")
    assert str(ahead.value) == str(plain.value) and "target" in str(ahead.value)
    assert not data._AHEAD


def test_a_hub_source_is_not_built_ahead():
    assert data.reserve_ahead(DataConfig(source="someone/some-dataset")) is None and not data._AHEAD
