"""A small model registry for scheduled retraining: the champion adapter and every candidate so far.

One JSON file (`registry.json`) holds the champion's id and the history of candidates with their
scores and data fingerprints. Updates take an exclusive file lock, then write a temporary file and
rename it into place, so readers never see half a file and the registry survives restarts and
concurrent runs.
"""

from __future__ import annotations

import fcntl
import json
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
    test_fingerprint: str  # the tokenized test set the score was measured on
    metric: str
    margin: float = 0.0
    score: float
    champion_id: str | None = None  # the champion it was compared with
    champion_score: float | None = None  # that champion's score on the same test examples
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


def decide(metric: str, margin: float, score: float, champion: Candidate | None,
           champion_score: float | None) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger beats it by `margin` on the same examples."""
    if champion is None or champion_score is None:
        return True, "no champion yet"
    gain = score - champion_score
    verdict = "beats" if gain >= margin else "does not beat"
    return gain >= margin, (f"{metric} {100 * score:.2f} vs champion {100 * champion_score:.2f} "
                            f"({100 * gain:+.2f}) {verdict} the required margin {100 * margin:+.2f}")

