"""Batch padding for training (right, dynamic) and generation (left)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass
class CompletionCollator:
    """Pad each batch to its own longest example: no compute on padding beyond the batch maximum.

    Labels are padded with -100 (ignored by the loss), attention_mask is 0 on padding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad(sequences: list[list[int]], pad_token_id: int):
    """(input_ids, attention_mask) with padding on the left, so every prompt ends at the last column."""
    import torch

    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, s in enumerate(sequences):
        if s:
            ids[row, longest - len(s) :] = torch.as_tensor(s)
            mask[row, longest - len(s) :] = 1
    return ids, mask
