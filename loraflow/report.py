"""Plain-text summaries printed at the end of a run."""

from __future__ import annotations

from typing import Any

KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def results_table(metrics: dict[str, Any]) -> str:
    """A small base-vs-fine-tuned ROUGE F1 table (x100)."""
    rows = [("fine-tuned", metrics["finetuned"])]
    if "base" in metrics:
        rows.insert(0, ("base", metrics["base"]))
    head = f"{'ROUGE F1 (x100)':<16}" + "".join(f"{k:>10}" for k in KEYS)
    lines = [f"ROUGE on {metrics['n_examples']} test examples", head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<16}" + "".join(f"{100 * m[f'{k}_fmeasure']:>10.2f}" for k in KEYS))
    if "base" in metrics:
        delta = metrics["finetuned"]["rougeL_fmeasure"] - metrics["base"]["rougeL_fmeasure"]
        lines.append(f"ROUGE-L change: {100 * delta:+.2f}")
    return "\n".join(lines)
