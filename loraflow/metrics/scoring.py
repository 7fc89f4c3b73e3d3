"""ROUGE of one split with n and intervals: what metrics.json says about the systems generated on it.

    summary, per = score_split({"finetuned": preds, "base": base_preds}, references, clusters, cfg.eval)
    summary = {"n_examples": 96, "n_clusters": 32,
               "finetuned": {"rougeL_fmeasure": 0.29, ...},            # means over rows (0..1)
               "base": {...},
               "intervals": {"finetuned": {"rougeL_fmeasure": {"mean", "ci95", "n", "n_clusters", ...}}, ...},
               "vs_base": {"rougeL_fmeasure": {"mean_diff": 0.06, "ci95": [0.03, 0.09], ...}, ...}}
    per = {"finetuned": {"rougeL_fmeasure": [one value per row], ...}, "base": {...}}

Intervals are the seeded cluster bootstrap of `loraflow.metrics.bootstrap` (rows of one cluster resampled
together); `vs_base` is paired: both systems on the same rows.
"""

from __future__ import annotations

from typing import Any, Sequence

from loraflow.metrics.bootstrap import cluster_bootstrap, compare
from loraflow.config import EvalConfig
from loraflow.metrics.rouge import KEYS

F1_KEYS = tuple(f"{k}_fmeasure" for k in KEYS)


def score_split(systems: dict[str, list[str]], references: Sequence[Sequence[str]], clusters: Sequence[str],
                ev: EvalConfig) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """Per-row ROUGE of every system, their means with intervals, and `vs_base` when "base" is among them."""
    from loraflow.metrics import rouge

    per = {name: rouge.per_example(preds, list(references), use_stemmer=ev.use_stemmer) for name, preds in systems.items()}
    n = len(references)
    summary: dict[str, Any] = {"n_examples": n, "n_clusters": len(set(clusters))}
    for name, scores in per.items():
        summary[name] = {key: sum(values) / n for key, values in scores.items()}
    summary["intervals"] = {
        name: {key: cluster_bootstrap(scores[key], clusters, ev.bootstrap_samples, ev.bootstrap_seed) for key in F1_KEYS}
        for name, scores in per.items()
    }
    if "base" in per and "finetuned" in per:
        summary["vs_base"] = compare(per["finetuned"], per["base"], F1_KEYS, clusters, ev.bootstrap_samples,
                                     ev.bootstrap_seed)
    return summary, per


def row_scores(per: dict[str, dict[str, list[float]]], name: str, i: int) -> dict[str, float]:
    """Row i's ROUGE F1 values of system `name`, for predictions.jsonl."""
    return {key: round(per[name][key][i], 6) for key in F1_KEYS}
