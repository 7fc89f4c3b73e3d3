"""Intervals for scores and paired comparisons: a seeded cluster bootstrap.

A mean ROUGE over 96 rows moves by a few points when other rows are drawn, so every score comes
with n and a 95% interval, and every comparison (fine-tuned vs base, challenger vs champion) with a
*paired* interval: both systems are scored on the same rows, so the row-to-row variation they share
cancels in the per-row differences and the interval is much tighter than two separate ones.

Rows that share an input (aclsum: three summaries of one paper) are not independent, so the bootstrap
resamples *clusters* (papers) with replacement and takes the mean over the rows of the drawn clusters.
Percentile interval over `samples` resamples; the same seed gives the same interval.
"""

from __future__ import annotations

from typing import Sequence


def _cluster_ids(clusters: Sequence[str] | None, n: int, what: str, one: str):
    """(cluster index of each of `n` values, number of clusters); no clusters: each value its own."""
    import numpy as np

    if clusters is not None and len(clusters) != n:
        raise ValueError(f"bootstrap: {n} {what} but {len(clusters)} cluster keys: pass one key per {one}")
    _, group = np.unique(np.asarray(clusters if clusters is not None else range(n), dtype=str), return_inverse=True)
    return group, int(group.max()) + 1


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[str] | None = None, samples: int = 1000,
                      seed: int = 0) -> dict[str, object]:
    """{"mean", "ci95": [lo, hi], "n", "n_clusters", "samples"} of the mean of `values`."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap: no values: score at least one example")
    group, k = _cluster_ids(clusters, x.size, "values", "value")
    sums = np.bincount(group, weights=x, minlength=k)
    counts = np.bincount(group, minlength=k).astype(float)
    draws = np.random.default_rng(seed).integers(0, k, size=(samples, k))  # clusters drawn with replacement
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)], "n": int(x.size), "n_clusters": k,
            "samples": samples}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], clusters: Sequence[str] | None = None,
                     samples: int = 1000, seed: int = 0) -> dict[str, object]:
    """{"mean_diff", "ci95", "n", "n_clusters", "samples"} of mean(a - b), `a` and `b` scored on the same rows."""
    if len(a) != len(b):
        raise ValueError(f"bootstrap: {len(a)} and {len(b)} scores: a paired comparison needs both on the same rows")
    out = cluster_bootstrap([x - y for x, y in zip(a, b)], clusters, samples, seed)
    return {"mean_diff": out.pop("mean"), **out}


def seeded_paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                            clusters: Sequence[str] | None = None, samples: int = 2000, seed: int = 0) -> dict[str, object]:
    """Two-level paired bootstrap for "system A trains better than B": `a[s][i]` and `b[s][i]` are the scores
    of row i by A and B trained with seed s (paired by seed, on the same rows). Each resample draws seeds with
    replacement, then clusters of rows with replacement, and takes the mean of a - b over both: the interval
    covers which training draw each side got as well as which test rows were drawn.
    {"mean_diff", "ci95", "seeds", "n", "n_clusters", "samples"}."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"bootstrap: scores of shape {x.shape} and {y.shape}: pass [seed][row] lists of one shape, "
                         "both sides trained with the same seeds and scored on the same rows")
    group, k = _cluster_ids(clusters, x.shape[1], "rows", "row")
    d, n_seeds = x - y, x.shape[0]  # [seeds, rows]
    sums = np.stack([np.bincount(group, weights=row, minlength=k) for row in d])  # [seeds, clusters]
    counts = np.bincount(group, minlength=k).astype(float)
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(samples, n_seeds))
    cluster_draws = rng.integers(0, k, size=(samples, k))
    # per resample: sum over drawn seeds of the drawn clusters' sums, over (drawn seeds x drawn clusters' rows)
    picked = sums[seed_draws[:, :, None], cluster_draws[:, None, :]].sum(axis=(1, 2))
    means = picked / (n_seeds * counts[cluster_draws].sum(axis=1))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean_diff": float(d.mean()), "ci95": [float(lo), float(hi)], "seeds": n_seeds, "n": int(d.shape[1]),
            "n_clusters": k, "samples": samples}


def compare(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]], keys: Sequence[str],
            clusters: Sequence[str] | None, samples: int, seed: int) -> dict[str, dict[str, object]]:
    """`paired_bootstrap` for each per-example score key (e.g. "rougeL_fmeasure") of two systems."""
    return {key: paired_bootstrap(a[key], b[key], clusters, samples, seed) for key in keys}


def fmt_interval(stats: dict[str, object], scale: float = 100.0) -> str:
    """'+6.57 [+3.10, +9.85]' for a paired result (or '23.45 [21.0, 25.9]' for a mean), x`scale`."""
    lo, hi = stats["ci95"]  # type: ignore[misc]
    if "mean_diff" in stats:
        return f"{scale * stats['mean_diff']:+.2f} [{scale * lo:+.2f}, {scale * hi:+.2f}]"  # type: ignore[operator]
    return f"{scale * stats['mean']:.2f} [{scale * lo:.2f}, {scale * hi:.2f}]"  # type: ignore[operator]
