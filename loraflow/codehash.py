"""What code and libraries a stage's result depends on: part of the stage's one key (`loraflow.store`),
so a code edit or a library upgrade invalidates the stage and what follows (never a hand-bumped version).

Module sources are hashed from their files without importing them: importing loraflow.trainer would
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

# The modules whose source shapes each stage's result (the one list: tasks.stages builds its keys from it).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("loraflow.data", "loraflow.aclsum", "loraflow.splits", "loraflow.chat", "loraflow.sources"),
    "tokenize": ("loraflow.prompts", "loraflow.tokenization", "loraflow.sources", "loraflow.chat"),  # sources: GGUF -> tokenizer
    "model": ("loraflow.modeling", "loraflow.sources", "loraflow.hardware"),
    "train": ("loraflow.training", "loraflow.trainer", "loraflow.collator", "loraflow.modeling", "loraflow.launch",
              "loraflow.worker", "loraflow.generation", "loraflow.tokenization"),
    "preflight": ("loraflow.preflight", "loraflow.memory"),  # and, through the evaluate key, every stage's
    "evaluate": ("loraflow.evaluation", "loraflow.rouge", "loraflow.modeling", "loraflow.scoring", "loraflow.bootstrap",
                 "loraflow.prompts", "loraflow.parity", "loraflow.generation", "loraflow.tokenization"),
    "export": ("loraflow.export", "loraflow.gguf_export", "loraflow.parity", "loraflow.modeling", "loraflow.generation",
               "loraflow.tokenization"),
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
