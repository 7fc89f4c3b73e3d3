"""What code and libraries a stage's result depends on: part of the stage's one key (`loraflow.store`),
so a code edit or a library upgrade invalidates the stage and what follows (never a hand-bumped version).

Module sources are hashed from their files without importing them: importing loraflow.stages.train.trainer would
pull in torch and transformers (~20 s) just to decide that a stage is cached.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "rouge-score")
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {"export": ("gguf",)}  # libraries only that stage's numbers depend on

# The modules whose source shapes each stage's result (the one list: `loraflow.store` builds the keys from it).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("loraflow.stages.data", "loraflow.stages.splits", "loraflow.stages.chat", "loraflow.store.aclsum",
             "loraflow.store.sources"),
    "tokenize": ("loraflow.stages.prompts", "loraflow.stages.tokenize", "loraflow.stages.chat",
                 "loraflow.store.sources"),  # sources: GGUF -> tokenizer
    "model": ("loraflow.stages.model", "loraflow.store.sources", "loraflow.hardware"),
    "train": ("loraflow.stages.train.stage", "loraflow.stages.train.trainer", "loraflow.stages.train.collators",
              "loraflow.stages.launch", "loraflow.stages.worker", "loraflow.stages.train.callbacks",
              "loraflow.stages.train.dropout", "loraflow.stages.model",
              "loraflow.stages.generation", "loraflow.stages.tokenize", "loraflow.stages.prompts"),
    "preflight": ("loraflow.stages.preflight", "loraflow.stages.memory"),  # and, through the evaluate key, every stage's
    "evaluate": ("loraflow.stages.evaluate", "loraflow.stages.generation", "loraflow.stages.parity",
                 "loraflow.stages.model", "loraflow.stages.prompts", "loraflow.stages.tokenize", "loraflow.metrics.rouge",
                 "loraflow.metrics.scoring", "loraflow.metrics.bootstrap"),
    "export": ("loraflow.stages.export", "loraflow.stages.gguf", "loraflow.stages.parity", "loraflow.stages.model",
               "loraflow.stages.generation", "loraflow.stages.tokenize"),
}


@lru_cache(maxsize=None)
def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for name in LIBRARIES + extra:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@lru_cache(maxsize=None)
def module_source_hash(*modules: str) -> str:
    """Hash of the modules' source files, read without importing them."""
    h = hashlib.sha256()
    for name in modules:
        spec = find_spec(name)
        if spec is None or not spec.origin:
            raise ModuleNotFoundError(f"cache key: no source for module {name!r}")
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def code_identity(stage: str) -> dict[str, object]:
    """{"code": source hash of the stage's modules, "libraries": versions}: a stage key's code part."""
    return {"code": module_source_hash(*STAGE_MODULES[stage]), "libraries": library_versions(STAGE_LIBRARIES.get(stage, ()))}
