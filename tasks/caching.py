"""Cache keys for the stage tasks: a hash of everything that determines a stage's output.

Prefect's default policy hashes the task's arguments and the task function's source; ours hashes
the config sections and upstream handles' fingerprints the stage depends on, the source of the
stage's *modules* (not only the thin task body), the content of external inputs (data files, model
weights), the output folder, and the versions of the libraries that shape the numbers.
On a miss, `explain_miss` says what changed since the last run of the same stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from loraflow.artifacts import Handle, write_json
from loraflow import codehash
from loraflow.config import key_fields
from loraflow.remote import is_url, local_path

def _location(output_dir: str) -> str:
    return output_dir.rstrip("/") if is_url(output_dir) else str(local_path(output_dir))


def _token(value: Any) -> Any:
    if isinstance(value, Handle):
        return value.fingerprint
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


@dataclass(frozen=True)
class StageSpec:
    """What a stage's cache key covers."""

    stage: str
    modules: tuple[str, ...]  # modules whose source is part of the key
    sections: tuple[str, ...] = ()  # config sections read from a `cfg` parameter (the rest is ignored)
    source: Callable[[dict[str, Any]], Any] | None = None  # content identity of external inputs

    def components(self, parameters: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in parameters.items() if k not in ("cfg", "run")}
        cfg = parameters.get("cfg")
        run = parameters.get("run") or (cfg.run if cfg is not None else None)
        out: dict[str, Any] = {
            "code": codehash.module_source_hash("tasks.stages", *self.modules),
            "libraries": codehash.library_versions(),
            "run.output_dir": _location(run.output_dir) if run is not None else None,
        }
        for name, value in sorted(params.items()):
            out[f"upstream {name}" if isinstance(value, Handle) else name] = _token(value)
        for name in self.sections:
            out[name] = key_fields(getattr(cfg, name))
        if self.source is not None:
            out["source content"] = self.source(parameters)
        return out

    def key(self, _ctx: Any, parameters: dict[str, Any]) -> str:
        blob = json.dumps(self.components(parameters), sort_keys=True, default=str)
        return f"loraflow-{self.stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}"))
        return out if obj else {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): obj}


def explain_miss(spec: StageSpec, parameters: dict[str, Any], output_dir: str | Path) -> str:
    """'what changed' since the last run of this stage writing to `output_dir`; remembers this run's inputs."""
    now = json.loads(json.dumps(spec.components(parameters), default=str))
    run = parameters.get("run") or getattr(parameters.get("cfg"), "run", None)
    record = Path(output_dir).expanduser() / spec.stage / "last-inputs.json"
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        before = None
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, now)
    if before is None:
        return "no earlier run in this output folder"
    old, new = _flatten(before), _flatten(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if run is not None and run.refreshes(spec.stage):
        return "refresh requested (run.refresh): recomputing" + (f"; also {', '.join(changed[:4])} changed" if changed else "")
    if not changed:
        return "same inputs as the last run, but no cached result (the result storage was cleared?)"
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"{shown} changed"
