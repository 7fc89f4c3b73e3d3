"""Batch padding for training: dynamic right padding to the batch's longest example.

Examples are stored unpadded (tokenize stage); padding happens per batch, so a batch costs only as
much as its longest example instead of `prompt.max_length`. Packed batches (`train.batching: packed`) are
transformers' `DataCollatorWithFlattening` (`stage.make_collator`): the examples laid end to end in one row,
positions restarting at 0 for each (transformers masks attention across the resets), the first label of each
masked; measured here (docs/benchmarks.md), on CPU with SDPA the block mask costs more than the padding it
saves, so `length_grouped` is the default. Generation left-pads with the tokenizer (`loraflow.stages.generation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from loraflow.stages.prompts import IGNORE_INDEX



def _pad(seqs: Sequence[Sequence[int]], value: int, length: int, side: str):
    """(batch, length) long tensor of `seqs` padded with `value` on `side`, and the 0/1 mask of real tokens."""
    import torch

    out = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        out[row, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return out, mask


@dataclass
class CompletionCollator:
    """Pads a list of {input_ids, labels} to the batch's longest example -> torch tensors.

    input_ids are padded with `pad_token_id`, labels with `label_pad` (ignored by the loss), and
    attention_mask is 0 on padding. Other keys in the examples are ignored.

    Why not transformers' `DataCollatorForSeq2Seq(label_pad_token_id=-100)`, which pads the same way: it pads
    on the tokenizer's `padding_side`, and many chat tokenizers default to left, which in training shifts
    every real token's position by the padding (the models number positions from the first column); this one
    pads right unless told otherwise, needs no tokenizer (the pre-flight's probe and the benchmarks use it on
    bare ids), and refuses rows whose labels do not match their ids, naming the fix.
    """

    pad_token_id: int
    label_pad: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None  # e.g. 8 lets tensor cores use aligned shapes
    padding_side: Literal["right", "left"] = "right"  # right for training: positions start at 0

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={self.padding_side!r}: expected 'right' or 'left'")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("CompletionCollator got an empty batch")
        ids = [f["input_ids"] for f in features]
        labels = [f["labels"] for f in features]
        for i, (a, b) in enumerate(zip(ids, labels)):
            if len(a) != len(b):
                raise ValueError(f"example {i}: {len(a)} input_ids but {len(b)} labels; re-run the tokenize stage")
        longest = max(len(s) for s in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        input_ids, attention_mask = _pad(ids, self.pad_token_id, longest, self.padding_side)
        label_ids, _ = _pad(labels, self.label_pad, longest, self.padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
