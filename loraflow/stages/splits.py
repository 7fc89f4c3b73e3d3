"""Which rows are train, validation and test: a split policy that keeps a row's split as data grows.

A source's own splits are used as they are (`data.train_split`, `validation_split`, `test_split`; the
names dev/val/valid mean validation). A split the source lacks is carved out of train, by a hash of
each row's *cluster* key (`data.cluster_column`, default the input text) and `data.seed`:
- test: the clusters whose hash h_test(key) < test_size (at least one cluster, for a tiny pool);
- validation: of the rest, the clusters whose h_val(key) < validation_size (a fraction), or the
  `validation_size` clusters with the smallest h_val (a count).
A fixed threshold on a per-row hash does not move when rows are added, so retraining on a growing
pool never scores a champion on rows it trained on (a seeded shuffle of the grown pool would mix
them); rows of one cluster (aclsum: one paper, three summaries) always land in the same split.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def unit_hash(key: str, seed: int, salt: str) -> float:
    """A number in [0, 1) that depends only on (key, seed, salt)."""
    digest = hashlib.sha256(f"{salt}\0{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def carve(keys: Sequence[str], size: float | int, seed: int, salt: str) -> list[bool]:
    """For each row, whether its cluster is carved out: hash < size (a fraction), or among the `size`
    clusters with the smallest hashes (a count)."""
    hashes = {k: unit_hash(k, seed, salt) for k in set(keys)}
    if isinstance(size, float) and size < 1:
        chosen = {k for k, h in hashes.items() if h < size}
        if not chosen and len(hashes) > 1:  # a pool too small for the fraction: its smallest-hash cluster
            chosen = {min(hashes, key=hashes.__getitem__)}
    else:
        chosen = set(sorted(hashes, key=hashes.__getitem__)[: int(size)])
    return [k in chosen for k in keys]


def smallest_hash_first(keys: Sequence[str], seed: int, salt: str) -> list[int]:
    """Row indices ordered by their cluster's hash: a cap keeps whole clusters, the same ones as data grows."""
    return sorted(range(len(keys)), key=lambda i: (unit_hash(keys[i], seed, salt), i))
