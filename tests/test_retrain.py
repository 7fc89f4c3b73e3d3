"""Scheduled retraining: unchanged data is all cache hits and no promotion; changed data trains a
challenger that is promoted or rejected as its score against the champion (same examples) says."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from loraflow.config import PromotionConfig, build_config
from loraflow.ops.registry import Candidate, Registry, decide
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

    def run(margin: float, rule: str = "interval"):
        config = cfg.model_copy(update={"promotion": PromotionConfig(metric="rougeL", margin=margin, rule=rule)})
        state = retrain(config, return_state=True)
        assert state.is_completed()
        return state, state.result()

    _, first = run(0.0)
    assert first["promoted"] and "no champion yet" in first["decision"]
    champion = registry.champion()
    assert champion is not None and first["champion"]["id"] == champion.id
    assert first["export"]["parity"]["passed"]  # the first champion exported right after its promotion

    # Unchanged data: every stage cached, nothing recorded, the champion stays.
    again, second = run(0.0)
    assert all(names == {"Cached"} for names in _task_states(again).values())
    assert second["decision"].startswith("unchanged") and not second["promoted"]
    assert registry.champion().id == champion.id and len(registry.read().candidates) == 1

    # New data arrives. A margin no challenger can meet: rejected, the champion stays.
    _grow(data, "batch-2.jsonl", 32, 64)
    _, third = run(1.0)
    assert not third["promoted"] and "rejected" in third["decision"] and third["export"] is None
    state = registry.read()
    challenger = state.candidates[-1]
    assert state.champion == champion.id and challenger.champion_id == champion.id
    assert challenger.data_fingerprint != champion.data_fingerprint
    assert challenger.test_fingerprint != champion.test_fingerprint  # the split grew: both scored on the new one
    assert challenger.champion_score is not None and challenger.score - challenger.champion_score < 1.0
    # The decision read the paired validation interval; the test comparison is recorded beside it.
    n_val = third["metrics"]["validation"]["n_examples"]
    assert challenger.validation["n"] == n_val and len(challenger.validation["ci95"]) == 2
    assert challenger.validation["mean_diff"] == pytest.approx(challenger.score - challenger.champion_score, abs=1e-5)
    assert challenger.test["n"] == third["metrics"]["n_examples"] and challenger.rule == "interval"
    assert challenger.base["model"]["name_or_path"] == str(tiny_llama_dir) and challenger.model_handle["stage"] == "model"
    assert "paired, n=" in challenger.reason and "on test (reported, not decided on)" in third["decision"]

    # Same challenger, by the mean rule with a margin its mean meets: promoted (no retraining: cached).
    lenient = challenger.validation["mean_diff"] - 1e-6
    again, fourth = run(lenient, rule="mean")
    assert fourth["promoted"], fourth["decision"]
    # no retraining (cached); the new champion is exported (export.enabled: auto = after a promotion)
    assert {s for s, names in _task_states(again).items() if names - {"Cached"}} == {"export"}
    assert fourth["export"]["parity"]["passed"] and Path(fourth["export"]["files"]["merged"]).is_dir()
    assert registry.champion().train_fingerprint == challenger.train_fingerprint
    assert [c.promoted for c in registry.read().candidates] == [True, False, True]


def _eval_dir(folder: Path, validation: list[float], test: list[float]) -> Path:
    """An evaluate-stage folder as the stage writes it: per-row scores of the fine-tuned model."""
    folder.mkdir()
    for name, scores in (("validation_predictions.jsonl", validation), ("predictions.jsonl", test)):
        (folder / name).write_text("".join(json.dumps({"cluster": f"c{i}", "prediction_scores": {"rougeL_fmeasure": x}})
                                           + "\n" for i, x in enumerate(scores)))
    return folder


def test_promotion_reads_validation_rows_and_only_reports_test(tmp_path):
    from flows.retrain import _paired
    from loraflow.store.artifacts import Handle

    # On validation the challenger is clearly better; on test it would be clearly worse.
    ours = Handle(stage="evaluate", path=str(_eval_dir(tmp_path / "ours", [0.5] * 20, [0.1] * 20)), fingerprint="o")
    theirs = Handle(stage="evaluate", path=str(_eval_dir(tmp_path / "theirs", [0.3] * 20, [0.4] * 20)), fingerprint="t")
    cfg = build_config({})
    validation = _paired(ours, theirs, "validation", "rougeL_fmeasure", cfg)
    test = _paired(ours, theirs, "test", "rougeL_fmeasure", cfg)
    assert validation["mean_diff"] == pytest.approx(0.2) and test["mean_diff"] == pytest.approx(-0.3)
    champ = Candidate(adapter="a", train_fingerprint="t", data_fingerprint="d", test_fingerprint="x",
                      metric="rougeL", score=0.30, promoted=True, reason="first")
    assert decide("rougeL", 0.0, "interval", champ, validation)[0] is True


def test_champions_on_another_base_model_are_not_compared():
    from flows.retrain import _base_of, refusal

    ours = _base_of(build_config({"model": {"name_or_path": "org/model-a"}}))
    champ = Candidate(adapter="a", train_fingerprint="t", data_fingerprint="d", test_fingerprint="x",
                      metric="rougeL", score=0.30, promoted=True, reason="first", base=ours)
    assert refusal(champ, ours) is None
    assert refusal(champ, {**ours, "lora": {"r": 64}}) is None  # another LoRA rank on the same base: comparable
    other = _base_of(build_config({"model": {"name_or_path": "org/model-b"}}))
    reason = refusal(champ, other)
    assert "refused" in reason and "org/model-a" in reason and "org/model-b" in reason and "\n" not in reason
    assert refusal(champ.model_copy(update={"base": None}), other) is None  # an older entry without its base


def test_decision_rule_and_atomic_registry(tmp_path):
    champ = Candidate(adapter="a", train_fingerprint="t", data_fingerprint="d", test_fingerprint="x",
                      metric="rougeL", score=0.30, promoted=True, reason="first")

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


def test_approval_outside_a_deployment_run_is_refused_before_any_stage(tmp_path, tiny_llama_dir, prefect_harness):
    from flows.approval import ApprovalNeedsDeployment
    from flows.retrain import retrain

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir)
    cfg = cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"require_approval": True})})
    with pytest.raises(ApprovalNeedsDeployment, match=r"needs a deployment run: start it with `prefect deployment run"):
        retrain(cfg)
    assert not (tmp_path / "runs" / "data").exists()


def test_the_approval_table_keeps_every_row_and_shows_a_dash_for_a_missing_score():
    from flows.approval import table
    from loraflow.ops.registry import Candidate

    common = dict(adapter="a", train_fingerprint="t", data_fingerprint="d", test_fingerprint="x", metric="rougeL",
                  promoted=False, reason="r")
    champion = Candidate(id="champ", score=0.3, test_score=0.31, **common)
    challenger = Candidate(id="chall", score=0.35, champion_id="champ", champion_score=None, test_score=None, **common)
    rows = table(challenger, champion, None).splitlines()
    assert rows[2] == "| challenger `chall` | 35.00 | – |"  # no test score yet: the row stays, with a dash
    assert rows[3] == "| champion `champ` | – | – |"  # not 0.00: unknown is not zero


def test_prefect_never_fails_an_unanswered_run_before_the_registry_reads_it_as_expired():
    """The suspend timeout ends at or after the registry's deadline, never before: once Prefect fails the run, the
    registry says expired, not pending. (Before: the timeout was rounded down, Prefect failed the run up to a
    second early, and the slow tier's approval test read "pending" after the run had failed.)"""
    from datetime import datetime, timedelta, timezone

    from flows.approval import suspend_seconds

    now = datetime(2026, 12, 4, 13, 0, 0, 400_000, tzinfo=timezone.utc)
    for left in (0.2, 1.0, 17.6, 18.0, 3600.9):
        deadline = now + timedelta(seconds=left)
        seconds = suspend_seconds(deadline.isoformat(), now)
        assert isinstance(seconds, int) and now + timedelta(seconds=seconds) >= deadline, left
        assert seconds - left < 1.0 + 1e-9, left  # and not longer than needed
    assert suspend_seconds((now - timedelta(seconds=5)).isoformat(), now) == 1  # a past deadline: Prefect's minimum


def test_a_champion_this_worker_cannot_find_is_never_replaced_unseen(tmp_path, tiny_llama_dir, prefect_harness):
    """The champion's stages are gone from this machine (another worker's cache, or deleted): the challenger is
    refused with the reason recorded, the champion stays, nothing is exported. (Before: promoted as if there
    were no champion.)"""
    from loraflow.hardware import resolve
    from flows.retrain import _base_of, retrain

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=2, save_steps=2)
    registry = Registry(tmp_path / "runs" / "registry")
    gone = Candidate(adapter=str(tmp_path / "elsewhere" / "train" / "k" / "adapter"), train_fingerprint="k",
                     data_fingerprint="d", test_fingerprint="x", metric="rougeL", score=0.2,
                     base=_base_of(resolve(cfg)),
                     promoted=True, reason="no champion yet")
    registry.record(gone)
    result = retrain(cfg)
    assert not result["promoted"] and result["export"] is None
    assert f"refused: champion {gone.id} is unavailable on this worker" in result["decision"]
    state = registry.read()
    assert state.champion == gone.id and len(state.candidates) == 2
    assert not state.candidates[-1].promoted and "unavailable on this worker" in state.candidates[-1].reason


def _promote_against_no_champion(folder: str, go, i: int) -> None:
    go.wait()  # both processes compared with "no champion" and now record at once
    Registry(folder).record(Candidate(adapter=f"a{i}", train_fingerprint=f"t{i}", data_fingerprint="d",
                                      test_fingerprint="x", metric="rougeL", score=0.3, promoted=True,
                                      reason="no champion yet"))


def test_promotion_is_a_compare_and_set_on_the_champion_it_was_compared_with(tmp_path):
    """Two processes that both compared against no champion promote at once: one becomes champion, the other is
    recorded as not promoted, saying the champion changed; an approval answered after a newer promotion is not
    a promotion either. (Before: both promoted, the last write won.)"""
    import multiprocessing

    from loraflow.ops.registry import Approval

    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(2)
    procs = [ctx.Process(target=_promote_against_no_champion, args=(str(tmp_path / "reg"), go, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    registry = Registry(tmp_path / "reg")
    state = registry.read()
    winner, loser = sorted(state.candidates, key=lambda c: not c.promoted)
    assert state.champion == winner.id and winner.promoted and not loser.promoted
    assert loser.reason.startswith(f"not promoted: the champion changed from none to {winner.id} while this run compared")

    # A challenger compared with `winner` waits for a person; meanwhile another one replaces `winner`.
    pending = registry.record(Candidate(adapter="p", train_fingerprint="tp", data_fingerprint="d", test_fingerprint="x",
                                        metric="rougeL", score=0.4, champion_id=winner.id, promoted=False,
                                        reason="awaiting approval"))
    newer = registry.record(Candidate(adapter="n", train_fingerprint="tn", data_fingerprint="d", test_fingerprint="x",
                                      metric="rougeL", score=0.5, champion_id=winner.id, promoted=True, reason="better"))
    answered = registry.resolve(pending.id, True, "approved by ana", Approval(deadline="2999-01-01T00:00:00+00:00",
                                                                              timeout_hours=1, status="approved"))
    assert not answered.promoted and f"changed from {winner.id} to {newer.id}" in answered.reason
    assert registry.read().champion == newer.id


def test_two_concurrent_retrain_runs_promote_one_challenger(tmp_path, tiny_llama_dir, prefect_harness, monkeypatch):
    """Two retraining runs (two configs, so two challengers) both find no champion and both want to promote; each
    waits for the other at the registry, as two runs racing on one machine can. One becomes champion; the other is
    recorded as not promoted, saying the champion changed. (Before: both promoted, the last write won.)"""
    from flows.retrain import retrain

    go = threading.Barrier(2, timeout=600)
    record = Registry.record

    def racing(self, candidate, *args, **kwargs):
        go.wait()
        return record(self, candidate, *args, **kwargs)

    monkeypatch.setattr(Registry, "record", racing)
    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=2, save_steps=2)
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"enabled": False})})
    configs = [cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": lr})}) for lr in (1e-2, 2e-3)]
    results: list = [None, None]

    def run(i: int) -> None:
        results[i] = retrain(configs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results), results
    state = Registry(tmp_path / "runs" / "registry").read()
    promoted = [c for c in state.candidates if c.promoted]
    assert len(state.candidates) == 2 and len(promoted) == 1 and state.champion == promoted[0].id
    [loser] = [c for c in state.candidates if not c.promoted]
    assert loser.reason.startswith(f"not promoted: the champion changed from none to {promoted[0].id}")
    assert sorted(r["promoted"] for r in results) == [False, True]
