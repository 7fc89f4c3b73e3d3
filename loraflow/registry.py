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
from typing import Iterator

from pydantic import BaseModel, Field


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
    promoted: bool
    reason: str


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
        try:
            return RegistryState.model_validate_json(self.file.read_text())
        except FileNotFoundError:
            return RegistryState()

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

    def record(self, candidate: Candidate) -> RegistryState:
        """Append `candidate` (making it champion if promoted), atomically."""
        with self._locked():
            state = self.read()
            state.candidates.append(candidate)
            if candidate.promoted:
                state.champion = candidate.id
            tmp = self.file.with_name(f".registry.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(state.model_dump_json(indent=2))
            with open(tmp) as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.file)
            return state


def base_identity(base: dict | None) -> tuple:
    """What makes two adapters comparable: the same base model (id, revision) and quantization."""
    base = base or {}
    model, quant = base.get("model") or {}, base.get("quantization") or {}
    return model.get("name_or_path"), model.get("revision"), quant.get("mode"), quant.get("compute_dtype")


def decide(metric: str, margin: float, rule: str, champion: Candidate | None,
           comparison: dict | None) -> tuple[bool, str]:
    """Promote when there is no champion, or when the paired validation comparison (challenger - champion)
    clears `margin`: its 95% lower bound (rule 'interval') or its mean (rule 'mean')."""
    if champion is None or comparison is None:
        return True, "no champion yet"
    diff, (lo, hi) = comparison["mean_diff"], comparison["ci95"]
    evidence = lo if rule == "interval" else diff
    promoted = evidence > margin if rule == "interval" else evidence >= margin
    what = "the 95% lower bound" if rule == "interval" else "the mean difference"
    verdict = "clears" if promoted else "does not clear"
    return promoted, (f"validation {metric} vs champion {100 * diff:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                      f"(paired, n={comparison['n']} in {comparison['n_clusters']} clusters): {what} "
                      f"{verdict} the required margin {100 * margin:+.2f}")
