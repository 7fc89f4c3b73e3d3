"""The built-in demo set: ACLSum (MIT), read straight from the `aclsum` package's jsonl files.

Each line of `dataset/{train,val,test}.jsonl` is one paper: `id`, `summary` {challenge, approach,
outcome: one sentence each} and `sentences` {abstract: [sentence, ...], ...}. The package's own
import needs `sienna`, so we locate its folder without importing it. Abstract sentences are stored
pre-tokenized ("systems ( MT ) do n't"); `detokenize` restores normal text, because a model trained
on "word , word" learns to write "word , word", which ROUGE (and readers) then see.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ASPECTS = ("challenge", "approach", "outcome")
SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}  # our name -> file stem

_CLOSING = set(",.;:!?%)]}")  # a token made only of these attaches to the previous token
_OPENING = {"(", "[", "{", "$"}  # these attach to the next token
_CLITICS = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}  # "do n't" -> "don't", "model 's" -> "model's"


class AclsumError(ValueError):
    """The aclsum package is missing or was asked for something it does not have."""


def detokenize(text: str) -> str:
    """Undo PTB-style tokenization: 'a , b ( MT ) do n't " x "' -> 'a, b (MT) don't "x"'.

    Works token by token, deciding for each whether it glues to its left and/or right neighbour.
    Text that is already normal passes through unchanged (the summaries are), so it is safe on both.
    """
    tokens = text.split()
    out: list[str] = []
    glue_next = False  # the previous token asked the next one to attach (opening bracket, quote)
    in_double = in_single = False  # quote state: a lone quote opens, the next one closes
    for i, tok in enumerate(tokens):
        prev = out[-1] if out else ""
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        left = right = False  # attach to the previous / the next token
        if all(c in _CLOSING for c in tok) or tok.lower() in _CLITICS or tok == "''":
            left = True
            tok = '"' if tok == "''" else tok
        elif tok in _OPENING or tok == "``":
            right = True
            tok = '"' if tok == "``" else tok
        elif tok == '"':
            left, right = in_double, not in_double
            in_double = not in_double
        elif tok == "'":
            # Plural possessive ("users ' opinions") vs a single-quoted phrase ("as ' B because A '"):
            # possessive when not inside a quote, after a word in -s, before a lower-case word.
            possessive = not in_single and prev[-1:].lower() == "s" and nxt[:1].islower()
            if possessive or in_single:
                left, in_single = True, False
            else:
                right, in_single = True, True
        elif tok in {"/", "-", "--"} and prev[-1:].isdigit() and nxt[:1].isdigit():
            left = right = True  # numeric ranges and ratios: "1 - 5" -> "1-5", "3 / 4" -> "3/4"
        elif tok == "/":
            left = right = True  # "speech / text" -> "speech/text"; a spaced " - " stays: it is a dash
        elif tok.endswith("/") and len(tok) > 1:
            right = True  # URL pieces: "github.com/ thunlp/ RE" -> "github.com/thunlp/RE"
        if out and (left or glue_next):
            out[-1] += tok
        else:
            out.append(tok)
        glue_next = right
    return " ".join(out)


def data_dir() -> Path:
    """The package's `dataset/` folder, found without importing the package."""
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise AclsumError("data.source=aclsum needs the 'aclsum' package (aclsum==0.1.2): install it: uv sync")
    folder = Path(spec.submodule_search_locations[0]) / "dataset"
    if not all((folder / f"{stem}.jsonl").is_file() for stem in set(SPLITS.values())):
        raise AclsumError(f"the aclsum package has no dataset files in {folder}: reinstall it: uv sync --reinstall")
    return folder


def version() -> str:
    """The installed package version (part of the data cache key, with the file digests)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("aclsum")
    except PackageNotFoundError:
        return "unknown"


def split_files() -> dict[str, Path]:
    """train/validation/test -> jsonl file."""
    folder = data_dir()
    return {name: folder / f"{stem}.jsonl" for name, stem in SPLITS.items() if name != "val"}


def load_aclsum(split: str, aspect: str = "all") -> list[dict[str, str]]:
    """Rows {id, aspect, input (the abstract), target (the one-sentence aspect summary)} of one split.

    `aspect="all"` gives one row per aspect per paper (3 rows per paper, same input).
    """
    if split not in SPLITS:
        raise AclsumError(f"aclsum has no split '{split}': use one of train, validation, test")
    if aspect != "all" and aspect not in ASPECTS:
        raise AclsumError(f"aclsum has no aspect '{aspect}': use one of {', '.join(ASPECTS)}, all")
    aspects = ASPECTS if aspect == "all" else (aspect,)
    rows = []
    with open(data_dir() / f"{SPLITS[split]}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            paper = json.loads(line)
            # Sentence by sentence, so an unbalanced quote in one sentence cannot flip the next one's.
            abstract = " ".join(detokenize(s) for s in paper["sentences"]["abstract"])
            for a in aspects:
                rows.append({"id": paper["id"], "aspect": a, "input": abstract, "target": detokenize(paper["summary"][a])})
    return rows
