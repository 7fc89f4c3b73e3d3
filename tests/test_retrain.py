"""Scheduled retraining: unchanged data is all cache hits and no promotion; changed data trains a
challenger that is promoted or rejected as its score against the champion (same examples) says."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from loraflow.config import PromotionConfig
from loraflow.registry import Candidate, Registry, decide
from test_flow_e2e import _task_states, tiny_config
from tests_support import write_examples


def _grow(folder: Path, name: str, n: int, offset: int) -> None:
    folder.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in write_examples(folder / ".tmp.jsonl", n + offset).read_text().splitlines()]
    (folder / ".tmp.jsonl").unlink()
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows[offset:]))


def test_retraining_promotes_only_what_beats_the_champion(tmp_path, tiny_llama_dir, prefect_harness):
    from flows.retrain import retrain

    data = tmp_path / "incoming"
    _grow(data, "batch-1.jsonl", 64, 0)
    cfg = tiny_config(tmp_path, data, tiny_llama_dir, max_steps=6, save_steps=6)
    registry = Registry(tmp_path / "runs" / "registry")

    def run(margin: float):
        config = cfg.model_copy(update={"promotion": PromotionConfig(metric="rougeL", margin=margin)})
        state = retrain(config, return_state=True)
        assert state.is_completed()
        return state, state.result()

    _, first = run(0.0)
    assert first["promoted"] and "no champion yet" in first["decision"]
    champion = registry.champion()
    assert champion is not None and first["champion"]["id"] == champion.id

    # Unchanged data: every stage cached, nothing recorded, the champion stays.
    again, second = run(0.0)
    assert all(names == {"Cached"} for names in _task_states(again).values())
    assert second["decision"].startswith("unchanged") and not second["promoted"]
    assert registry.champion().id == champion.id and len(registry.read().candidates) == 1

    # New data arrives. A margin no challenger can meet: rejected, the champion stays.
    _grow(data, "batch-2.jsonl", 32, 64)
    _, third = run(1.0)
    assert not third["promoted"] and "rejected" in third["decision"]
    state = registry.read()
    challenger = state.candidates[-1]
    assert state.champion == champion.id and challenger.champion_id == champion.id
    assert challenger.data_fingerprint != champion.data_fingerprint
    assert challenger.test_fingerprint != champion.test_fingerprint  # the split grew: both scored on the new one
    assert challenger.champion_score is not None and challenger.score - challenger.champion_score < 1.0

    # Same challenger, a margin it does meet: promoted (no retraining: its stages are cached).
    lenient = challenger.score - challenger.champion_score - 1e-6
    again, fourth = run(lenient)
    assert fourth["promoted"], fourth["decision"]
    assert {s for s, names in _task_states(again).items() if names - {"Cached"}} == set()
    assert registry.champion().train_fingerprint == challenger.train_fingerprint
    assert [c.promoted for c in registry.read().candidates] == [True, False, True]


def test_decision_rule_and_atomic_registry(tmp_path):
    champ = Candidate(adapter="a", train_fingerprint="t", data_fingerprint="d", test_fingerprint="x",
                      metric="rougeL", score=0.30, promoted=True, reason="first")
    assert decide("rougeL", 0.0, 0.31, None, None) == (True, "no champion yet")
    assert decide("rougeL", 0.02, 0.31, champ, 0.30)[0] is False
    assert decide("rougeL", 0.01, 0.31, champ, 0.30)[0] is True
    assert decide("rougeL", 0.0, 0.29, champ, 0.30)[0] is False

    registry = Registry(tmp_path / "reg")
    registry.record(champ)

    def add(i: int) -> None:
        registry.record(Candidate(adapter=f"a{i}", train_fingerprint=f"t{i}", data_fingerprint="d",
                                  test_fingerprint="x", metric="rougeL", score=0.1, promoted=False, reason="r"))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = Registry(tmp_path / "reg").read()  # a fresh reader, as after a restart
    assert len(state.candidates) == 17 and state.champion == champ.id
    assert not list((tmp_path / "reg").glob(".registry.*.tmp"))
