"""Cache keys for the stage tasks: a hash of everything that determines a stage's output.

Prefect's default policy hashes the task's arguments and the task function's source; ours hashes
the config sections and upstream handles' fingerprints it is given, the source of the stage's
*module* (not only the thin task body), the data source's content for the data stage, and the
versions of the libraries that shape the numbers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from functools import lru_cache
from importlib import import_module, metadata
from typing import Any

from pydantic import BaseModel

from loraflow.artifacts import Handle

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "rouge-score")


@lru_cache(maxsize=None)
def library_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for name in LIBRARIES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "absent"))
    return tuple(out)


@lru_cache(maxsize=None)
def module_source_hash(*modules: str) -> str:
    h = hashlib.sha256()
    for name in modules:
        h.update(inspect.getsource(import_module(name)).encode())
    return h.hexdigest()[:16]


def _token(value: Any) -> Any:
    if isinstance(value, Handle):
        return {"stage": value.stage, "fingerprint": value.fingerprint}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def stage_key(stage: str, modules: tuple[str, ...], parameters: dict[str, Any], extra: Any = None) -> str:
    blob = json.dumps(
        {
            "stage": stage,
            "code": module_source_hash(*modules),
            "libs": library_versions(),
            "params": {k: _token(v) for k, v in sorted(parameters.items())},
            "extra": extra,
        },
        sort_keys=True,
        default=str,
    )
    return f"loraflow-{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"
