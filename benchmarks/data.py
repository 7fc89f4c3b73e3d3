"""The benchmark's examples: SciTLDR (../shared/data/scitldr) or aclsum, written as train/test jsonl
that loraflow (as a local data source) and the baseline script both read, so both see the same rows.

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
    from loraflow.aclsum import load_aclsum

    return [{"input": r["input"], "target": [r["target"]], "aspect": r["aspect"]} for r in load_aclsum(split, "all")]


def raw_splits(name: str) -> tuple[list[dict], list[dict]]:
    if name == "scitldr":
        if not (SCITLDR / "train.jsonl").is_file():
            raise SystemExit(f"error: SciTLDR not found at {SCITLDR}: put the shared data folder next to the repo")
        return _scitldr("train"), _scitldr("dev")
    if name == "aclsum":
        return _aclsum("train"), _aclsum("test")
    raise SystemExit(f"error: unknown dataset {name!r}: choose scitldr or aclsum")


def write_examples(name: str, model_dir: str | Path, out_dir: Path, n_train: int, n_test: int, max_length: int,
                   seed: int = 0) -> dict:
    """Write out_dir/{train,test}.jsonl; returns counts and the mean target length in tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    instruction = INSTRUCTIONS[name]

    def fits(row: dict) -> int:
        prompt = tok.apply_chat_template([{"role": "user", "content": instruction.format(**row)}], tokenize=False,
                                         add_generation_prompt=True)
        n = len(tok(prompt + row["target"][0] + tok.eos_token, add_special_tokens=False)["input_ids"])
        return n if n <= max_length else 0

    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {"dataset": name}
    for split, rows, n in zip(("train", "test"), raw_splits(name), (n_train, n_test)):
        random.Random(seed).shuffle(rows)
        kept, lengths = [], []
        for row in rows:
            if len(kept) == n:
                break
            if length := fits(row):
                kept.append(row)
                lengths.append(length)
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        stats[f"n_{split}"] = len(kept)
        stats[f"mean_tokens_{split}"] = round(sum(lengths) / len(lengths), 1)
        stats[f"mean_target_tokens_{split}"] = round(
            sum(len(tok(r["target"][0], add_special_tokens=False)["input_ids"]) + 1 for r in kept) / len(kept), 1)
    return stats
