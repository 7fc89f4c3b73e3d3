"""The built-in demo set: ACLSum (MIT), read straight from the `aclsum` package's jsonl files.

The package's own import needs `sienna`, so we locate its folder without importing it. Abstract
sentences are stored pre-tokenized ("systems ( MT ) do n't"); `detokenize` restores normal text.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ASPECTS = ("challenge", "approach", "outcome")
SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}

_RULES = [
    (re.compile(r"\s+([,.;:!?%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$])\s+"), r"\1"),  # no space after opening brackets
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE), r"\1"),  # clitics: do n't -> don't
    (re.compile(r"``\s*|\s*''"), '"'),  # PTB-style quotes
    (re.compile(r'"\s+([^"]*?)\s+"'), r'"\1"'),  # " quoted " -> "quoted"
    (re.compile(r"(\w)\s+-\s+(\w)"), r"\1-\2"),  # state - of - the - art -> state-of-the-art
    (re.compile(r"\s{2,}"), " "),
]


class AclsumError(ValueError):
    """The aclsum package is missing or broken; the message says how to fix it."""


def detokenize(text: str) -> str:
    """Undo PTB-style tokenization: 'word , word ( x ) do n't' -> 'word, word (x) don't'."""
    out = f" {text.strip()} "
    for pattern, repl in _RULES:
        out = pattern.sub(repl, out)
    return out.strip()


def data_dir() -> Path:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise AclsumError("data.source=aclsum needs the 'aclsum' package: run `uv sync` in the repo")
    folder = Path(spec.submodule_search_locations[0]) / "dataset"
    if not (folder / "train.jsonl").is_file():
        raise AclsumError(f"the aclsum package has no dataset files in {folder}: reinstall it (uv sync --reinstall)")
    return folder


def split_files() -> dict[str, Path]:
    folder = data_dir()
    return {name: folder / f"{stem}.jsonl" for name, stem in SPLITS.items() if name != "val"}


def load_aclsum(split: str, aspect: str = "all") -> list[dict[str, str]]:
    """Rows {id, aspect, input (abstract), target (one-sentence aspect summary)} of one split."""
    if split not in SPLITS:
        raise AclsumError(f"aclsum has no split '{split}': use one of train, validation, test")
    aspects = ASPECTS if aspect == "all" else (aspect,)
    rows = []
    with open(data_dir() / f"{SPLITS[split]}.jsonl") as fh:
        for line in fh:
            if not line.strip():
                continue
            paper = json.loads(line)
            abstract = detokenize(" ".join(paper["sentences"]["abstract"]))
            for a in aspects:
                rows.append({"id": paper["id"], "aspect": a, "input": abstract, "target": detokenize(paper["summary"][a])})
    return rows
