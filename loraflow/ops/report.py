"""Plain-text summaries printed at the end of a run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loraflow.metrics.rouge import KEYS


def _ci(stats: dict[str, Any] | None) -> str:
    from loraflow.metrics.bootstrap import fmt_interval

    return fmt_interval(stats) if stats else "–"


def results_table(metrics: dict[str, Any]) -> str:
    """A base-vs-fine-tuned ROUGE F1 table (x100), then ROUGE-L with 95% intervals and n."""
    rows = [("fine-tuned", metrics["finetuned"])]
    if "base" in metrics:
        rows.insert(0, ("base", metrics["base"]))
    head = f"{'ROUGE F1 (x100)':<16}" + "".join(f"{k:>10}" for k in KEYS)
    clusters = metrics.get("n_clusters")
    size = f"{metrics['n_examples']} test examples" + (f" ({clusters} clusters)" if clusters else "")
    lines = [f"ROUGE on {size}", head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<16}" + "".join(f"{100 * m[f'{k}_fmeasure']:>10.2f}" for k in KEYS))
    intervals = metrics.get("intervals", {})
    if intervals:
        lines.append("ROUGE-L, 95% cluster-bootstrap intervals: " + ", ".join(
            f"{label} {_ci(intervals.get(who, {}).get('rougeL_fmeasure'))}"
            for label, who in (("base", "base"), ("fine-tuned", "finetuned")) if who in intervals))
    if "base" in metrics:
        delta = metrics["finetuned"]["rougeL_fmeasure"] - metrics["base"]["rougeL_fmeasure"]
        paired = metrics.get("vs_base", {}).get("rougeL_fmeasure")
        lines.append(f"ROUGE-L change: {_ci(paired) if paired else f'{100 * delta:+.2f}'}"
                     + (" (paired 95% interval)" if paired else ""))
    val = metrics.get("validation")
    if val:
        lines.append(f"validation ROUGE-L (fine-tuned, n={val['n_examples']}, what sweeps and promotion read): "
                     f"{_ci(val['intervals']['finetuned']['rougeL_fmeasure'])}")
    return "\n".join(lines)


def export_table(export: dict[str, Any]) -> str:
    """The export's parity with the evaluated model, one line per format, then its files."""
    parity = export["parity"]
    head = f"{'export':<12}{'top-1':>8}{'max|dlogit|':>13}{'mean|dlogit|':>14}{'greedy =':>10}{'MB':>8}  gate"
    gated = any(c["gated"] for c in parity["checks"])
    verdict = ("passed" if parity["passed"] else "FAILED") if gated else "reported only (export.base=original is not gated)"
    lines = [f"export parity with the evaluated model, {parity['n']} validation rows: {verdict}", head, "-" * len(head)]
    for c in parity["checks"]:
        lines.append(f"{c['label']:<12}{c['top1_agreement']:>8.3f}{c['max_abs_logit_diff']:>13.4f}"
                     f"{c['mean_abs_logit_diff']:>14.5f}{c['greedy_exact_match']:>10.3f}"
                     f"{export['size_mb'][c['format']]:>8}  {'gated' if c['gated'] else 'reported only'}")
    lines += [f"{fmt}: {path}" for fmt, path in export["files"].items()]
    return "\n".join(lines)


def artifact_prefix() -> str:
    """The Prefect artifact keys' prefix: the deployment's name, else the flow's (lowercase, dashes)."""
    from prefect.runtime import deployment, flow_run

    name = deployment.name or flow_run.flow_name or "loraflow"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "loraflow"


def logged_history(train_dir: str | Path) -> list[dict[str, Any]]:
    """What the Trainer logged (loss, learning_rate, grad_norm, eval_*), one entry per logging step, from the
    train stage's trainer_state.json ([] when it cannot be read): what the loss-curve artifact and MLflow plot."""
    try:
        return json.loads((Path(train_dir) / "trainer_state.json").read_text())["log_history"]
    except (OSError, ValueError, KeyError):
        return []
