"""A small model registry for scheduled retraining: the champion adapter and every candidate so far.

One JSON file (`registry.json`) holds the champion's id and the history of candidates with their
scores and data fingerprints. Updates take an exclusive file lock, then write a temporary file and
rename it into place, so readers never see half a file and the registry survives restarts and
concurrent runs.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import BaseModel, Field


class DataEvent(BaseModel):
    """The `loraflow.data.updated` event a triggered retraining run was started for (`loraflow.ops.events`)."""

    source: str = Field(description="The data folder or file the event is for (absolute path).")
    fingerprint: str = Field(description="Its content fingerprint when the event was emitted.")
    event_id: str | None = Field(None, description="The Prefect event's id.")
    occurred: str | None = Field(None, description="When the event was emitted (ISO 8601).")


class Approval(BaseModel):
    """A person's say on a promotion (`promotion.require_approval`): asked, then answered or timed out."""

    status: Literal["pending", "approved", "rejected", "expired"] = "pending"
    deadline: str  # ISO 8601, UTC: no answer by then is a rejection
    timeout_hours: float
    flow_run_id: str | None = None  # the suspended run that asks
    rule_reason: str = ""  # what the promotion rule said
    table: str = ""  # champion vs challenger, as shown to the approver (markdown)
    stages: dict[str, dict] | None = None  # the stage handles the challenger was judged on (a resumed run uses them)
    approver: str | None = None
    comment: str | None = None
    answered_at: str | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) >= datetime.fromisoformat(self.deadline)


class Candidate(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    flow_run_id: str | None = None
    adapter: str
    train_fingerprint: str
    data_fingerprint: str
    test_fingerprint: str  # the tokenized data (validation + test) the scores were measured on
    metric: str
    margin: float = 0.0
    rule: str = "mean"
    score: float  # validation `metric` F1: what the decision read
    champion_id: str | None = None  # the champion it was compared with
    champion_score: float | None = None  # that champion's validation score on the same rows
    validation: dict | None = None  # paired bootstrap, challenger - champion: mean_diff, ci95, n, n_clusters
    test: dict | None = None  # the same on the test split: reported, never decided on
    test_score: float | None = None
    base: dict | None = None  # what the adapter needs: base model, quantization, LoRA settings
    model_handle: dict | None = None  # the model stage it was trained from (to re-score it on its own base)
    trigger: DataEvent | None = None  # the data event that started the run (None: on demand or by schedule)
    approval: Approval | None = None  # with promotion.require_approval: the question and its answer
    promoted: bool
    reason: str

    def awaiting(self, now: datetime | None = None) -> bool:
        """Waiting for a person's answer, before its deadline."""
        return self.approval is not None and self.approval.status == "pending" and not self.approval.expired(now)


class RegistryState(BaseModel):
    champion: str | None = None
    candidates: list[Candidate] = []

    def get(self, candidate_id: str | None) -> Candidate | None:
        return next((c for c in self.candidates if c.id == candidate_id), None)


class Registry:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.file = self.folder / "registry.json"

    def read(self) -> RegistryState:
        """The registry, with every approval whose deadline has passed read as the rejection it is."""
        try:
            return _expire(RegistryState.model_validate_json(self.file.read_text()))
        except FileNotFoundError:
            return RegistryState()

    def asked_by(self, flow_run_id: str) -> Candidate | None:
        """The candidate a (now resumed) flow run recorded as pending before it suspended, if any."""
        return next((c for c in reversed(self.read().candidates)
                     if c.approval is not None and c.approval.flow_run_id == flow_run_id and c.approval.status == "pending"),
                    None)

    def pending(self, train_fingerprint: str) -> Candidate | None:
        """The challenger with this adapter that still waits for a person's answer, if any."""
        return next((c for c in reversed(self.read().candidates)
                     if c.train_fingerprint == train_fingerprint and c.awaiting()), None)

    def champion(self) -> Candidate | None:
        state = self.read()
        return state.get(state.champion)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".registry.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record(self, candidate: Candidate, champion_now: ChampionNow | None = None) -> Candidate:
        """Append `candidate`, atomically; a promoted one becomes champion only if the champion is still the one it
        was compared with (`candidate.champion_id`), else it is recorded as not promoted, saying why (compare-and-set:
        two concurrent runs, or an answer after a newer promotion). `champion_now`: where the champion is read
        (default: this registry's pointer; with promotion.registry=mlflow, the alias). Returns what was recorded."""
        with self._locked():
            state = self.read()
            candidate = _still_champion(candidate, state, champion_now)
            state.candidates.append(candidate)
            if candidate.promoted:
                state.champion = candidate.id
            self._write(state)
            return candidate

    def resolve(self, candidate_id: str, promoted: bool, reason: str, approval: Approval,
                champion_now: ChampionNow | None = None) -> Candidate:
        """Answer a pending candidate in place (making it champion if promoted and the champion is still the one it
        was compared with, as in `record`), atomically."""
        with self._locked():
            state = self.read()
            candidate = state.get(candidate_id)
            if candidate is None:
                raise KeyError(f"registry {self.file}: no candidate {candidate_id}")
            candidate.promoted, candidate.reason, candidate.approval = promoted, reason, approval
            checked = _still_champion(candidate, state, champion_now)
            candidate.promoted, candidate.reason = checked.promoted, checked.reason
            if candidate.promoted:
                state.champion = candidate.id
            self._write(state)
            return candidate

    def expire(self) -> RegistryState:
        """Write down the rejections of approvals that timed out (`read` already shows them)."""
        with self._locked():
            return self._write(self.read())

    def _write(self, state: RegistryState) -> RegistryState:
        tmp = self.file.with_name(f".registry.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        with open(tmp) as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.file)
        return state


ChampionNow = Callable[[RegistryState], "str | None"]


def _still_champion(candidate: Candidate, state: RegistryState, champion_now: ChampionNow | None) -> Candidate:
    """`candidate`, demoted with the reason when the champion changed since it was compared."""
    if not candidate.promoted:
        return candidate
    now = champion_now(state) if champion_now is not None else state.champion
    if now == candidate.champion_id:
        return candidate
    return candidate.model_copy(update={"promoted": False, "reason": (
        f"not promoted: the champion changed from {candidate.champion_id or 'none'} to {now or 'none'} while this run "
        f"compared (the rule said: {candidate.reason}); rerun to compare with the current champion")})


def _expire(state: RegistryState) -> RegistryState:
    now = datetime.now(timezone.utc)
    for c in state.candidates:
        if c.approval is not None and c.approval.status == "pending" and c.approval.expired(now):
            hours = f"{c.approval.timeout_hours:g}"
            c.approval.status = "expired"
            c.reason = f"rejected: no answer within {hours} hours (asked in flow run {c.approval.flow_run_id})"
    return state


def base_identity(base: dict | None) -> tuple:
    """What makes two adapters comparable: the same base model (id, revision) and quantization."""
    base = base or {}
    model, quant = base.get("model") or {}, base.get("quantization") or {}
    return model.get("name_or_path"), model.get("revision"), quant.get("mode"), quant.get("compute_dtype")


def decide(metric: str, margin: float, rule: str, champion: Candidate | None,
           comparison: dict | None) -> tuple[bool, str]:
    """Promote when there is no champion, or when the paired validation comparison (challenger - champion)
    clears `margin` (no comparison with an existing champion: refused): its 95% lower bound (rule 'interval') or its mean (rule 'mean')."""
    if champion is None:
        return True, "no champion yet"
    if comparison is None:  # never promote over a champion without comparing with it
        return False, f"refused: no comparison with champion {champion.id}; the champion stays"
    diff, (lo, hi) = comparison["mean_diff"], comparison["ci95"]
    evidence = lo if rule == "interval" else diff
    promoted = evidence > margin if rule == "interval" else evidence >= margin
    what = "the 95% lower bound" if rule == "interval" else "the mean difference"
    verdict = "clears" if promoted else "does not clear"
    return promoted, (f"validation {metric} vs champion {100 * diff:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                      f"(paired, n={comparison['n']} in {comparison['n_clusters']} clusters): {what} "
                      f"{verdict} the required margin {100 * margin:+.2f}")


def current_champion(cfg, registry: Registry) -> Candidate | None:
    """The champion, the one answer retraining, `loraflow cache gc` and the export read: with
    `promotion.registry: mlflow` the candidate the MLflow alias `champion` points at, else the registry's pointer."""
    if cfg.promotion.registry == "mlflow":
        from loraflow.ops.tracking import champion_id

        candidate_id = champion_id(cfg)
        return registry.read().get(candidate_id) if candidate_id else None
    return registry.champion()
