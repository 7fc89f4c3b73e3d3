"""The benchmark's examples: SciTLDR (../shared/data/scitldr) or aclsum, written as train/validation/test
jsonl that loraflow (as a local data source) and the side scripts all read, so every side trains on the same
rows: with a validation file of its own, loraflow carves nothing out of train. aclsum's validation rows come
from its validation split; SciTLDR has no test split with references, so its test and validation rows both
come from dev, disjoint (test first, then validation from the rest of the same shuffled order).

Only examples whose prompt + target fit `max_length` tokens are kept: loraflow never cuts an input
then, and the baseline (which truncates from the right, as plain scripts do) never cuts a target.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCITLDR = REPO.parent / "shared" / "data" / "scitldr"
INSTRUCTIONS = {
    "scitldr": "Summarize this paper in one sentence.\n\n{input}",
    "aclsum": "Summarize the {aspect} of this paper in one sentence.\n\n{input}",
}


def _scitldr(split: str) -> list[dict]:
    rows = [json.loads(line) for line in (SCITLDR / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return [{"input": " ".join(r["source"]), "target": list(r["target"])} for r in rows if r["source"] and r["target"]]


def _aclsum(split: str) -> list[dict]:
    from loraflow.store.aclsum import load_aclsum

    return [{"input": r["input"], "target": [r["target"]], "aspect": r["aspect"]} for r in load_aclsum(split, "all")]


def raw_splits(name: str) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} rows of `name`, before the length filter and the draw."""
    if name == "scitldr":
        if not (SCITLDR / "train.jsonl").is_file():
            raise SystemExit(f"error: SciTLDR not found at {SCITLDR}: put the shared data folder next to the repo")
        return {"train": _scitldr("train"), "dev": _scitldr("dev")}
    if name == "aclsum":
        return {"train": _aclsum("train"), "validation": _aclsum("validation"), "test": _aclsum("test")}
    raise SystemExit(f"error: unknown dataset {name!r}: choose scitldr or aclsum")


def write_examples(name: str, model_dir: str | Path, out_dir: Path, n_train: int, n_test: int, max_length: int,
                   seed: int = 0, n_validation: int = 32) -> dict:
    """Write out_dir/{train,validation,test}.jsonl; returns counts and the mean lengths in tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    instruction = INSTRUCTIONS[name]

    def fits(row: dict) -> int:
        prompt = tok.apply_chat_template([{"role": "user", "content": instruction.format(**row)}], tokenize=False,
                                         add_generation_prompt=True)
        n = len(tok(prompt + row["target"][0] + tok.eos_token, add_special_tokens=False)["input_ids"])
        return n if n <= max_length else 0

    def draw(rows: list[dict], n: int) -> tuple[list[dict], list[int], list[dict]]:
        """The first `n` rows that fit, their lengths, and the rows after them (in order)."""
        kept, lengths = [], []
        for i, row in enumerate(rows):
            if len(kept) == n:
                return kept, lengths, rows[i:]
            if length := fits(row):
                kept.append(row)
                lengths.append(length)
        return kept, lengths, []

    raw = raw_splits(name)
    for rows in raw.values():
        random.Random(seed).shuffle(rows)
    drawn: dict[str, tuple[list[dict], list[int]]] = {}
    drawn["train"] = draw(raw["train"], n_train)[:2]
    if "dev" in raw:  # SciTLDR: test rows from dev, then validation rows from dev's rest: disjoint
        test, test_lengths, rest = draw(raw["dev"], n_test)
        drawn["test"] = test, test_lengths
        drawn["validation"] = draw(rest, n_validation)[:2]
    else:
        drawn["test"] = draw(raw["test"], n_test)[:2]
        drawn["validation"] = draw(raw["validation"], n_validation)[:2]
    if {r["input"] for r in drawn["test"][0]} & {r["input"] for r in drawn["validation"][0]}:
        raise SystemExit(f"error: {name}: validation and test rows overlap")

    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {"dataset": name}
    for split in ("train", "validation", "test"):
        kept, lengths = drawn[split]
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        stats[f"n_{split}"] = len(kept)
        stats[f"mean_tokens_{split}"] = round(sum(lengths) / len(lengths), 1)
        stats[f"mean_target_tokens_{split}"] = round(
            sum(len(tok(r["target"][0], add_special_tokens=False)["input_ids"]) + 1 for r in kept) / len(kept), 1)
    return stats
