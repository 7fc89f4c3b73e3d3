"""What a run shows in the Prefect UI: artifacts with keys that are stable per deployment.

- `<prefix>-rouge`: ROUGE F1 table, base vs fine-tuned (vs the champion, when retraining);
- `<prefix>-predictions`: sample predictions next to their references;
- `<prefix>-train-progress`: training progress, updated at every logging step;
- `<prefix>-loss-curve`: the training loss as a picture (SVG in markdown);
- `<prefix>-adapter`: a link to the adapter folder;
- `<prefix>-export`: the export's parity table and where its files are (when the export stage ran).
`<prefix>` is the deployment's name (the flow's name for runs outside a deployment), so the
Artifacts page keeps the history of each deployment's results.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable

from loraflow.ops.report import artifact_prefix, logged_history
from loraflow.metrics.rouge import KEYS

N_SAMPLES = 8


def rouge_rows(scores: dict[str, dict[str, float]], intervals: dict[str, dict[str, Any]] | None = None,
               vs_base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """ROUGE F1 x100 per model, each with its ROUGE-L 95% interval; then the paired change over base."""
    from loraflow.metrics.bootstrap import fmt_interval

    intervals = intervals or {}
    rows = [{"model": {"finetuned": "fine-tuned"}.get(who, who), **{k: round(100 * m[f"{k}_fmeasure"], 2) for k in KEYS},
             "rougeL 95% CI": fmt_interval(intervals[who]["rougeL_fmeasure"]) if who in intervals else "–"}
            for who, m in scores.items()]
    if vs_base:
        rows.append({"model": "fine-tuned − base (paired)",
                     **{k: round(100 * vs_base[f"{k}_fmeasure"]["mean_diff"], 2) for k in KEYS},
                     "rougeL 95% CI": fmt_interval(vs_base["rougeL_fmeasure"])})
    return rows


def publish_results(metrics: dict[str, Any], eval_dir: str, train_dir: str, champion: dict[str, Any] | None = None,
                    decision: str | None = None) -> None:
    """ROUGE table, sample predictions, loss curve and adapter link for this run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    prefix = artifact_prefix()
    scores = {"base": metrics["base"]} if "base" in metrics else {}
    scores["finetuned"] = metrics["finetuned"]
    if champion is not None:
        scores["champion"] = champion
    what = (f"ROUGE F1 x100 on {metrics['n_examples']} test examples ({metrics.get('n_clusters', '?')} clusters), "
            "95% cluster-bootstrap intervals" + (f". {decision}" if decision else ""))
    rows = rouge_rows(scores, metrics.get("intervals"), metrics.get("vs_base"))
    create_table_artifact(rows, key=f"{prefix}-rouge", description=what)

    rows = []
    with open(Path(eval_dir) / "predictions.jsonl") as fh:
        for line, _ in zip(fh, range(N_SAMPLES)):
            r = json.loads(line)
            rows.append({"input": _clip(r.get("input") or "", 300), "reference": _clip(r["references"][0], 300),
                         "fine-tuned": r["prediction"], **({"base": r["base_prediction"]} if "base_prediction" in r else {})})
    create_table_artifact(rows, key=f"{prefix}-predictions", description=f"First {len(rows)} test predictions")

    losses = _losses(train_dir)
    if losses:
        svg = loss_curve_svg(losses)
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        create_markdown_artifact(f"![training loss]({uri})\n\nloss {losses[0][1]:.3f} at step {losses[0][0]} -> "
                                 f"{losses[-1][1]:.3f} at step {losses[-1][0]}",
                                 key=f"{prefix}-loss-curve", description="Training loss by step")
    adapter = Path(train_dir) / "adapter"
    create_link_artifact(adapter.resolve().as_uri(), link_text=str(adapter), key=f"{prefix}-adapter",
                         description="The trained LoRA adapter (load with peft's PeftModel.from_pretrained)")


def publish_export(info: dict[str, Any], export_dir: str) -> None:
    """The export's parity numbers per format, against the model the evaluate stage scored, and its files."""
    from prefect.artifacts import create_markdown_artifact

    parity = info["parity"]
    lines = [f"**Export** ({info['format']}, base {info['base']}): parity with the evaluated model on {parity['n']} "
             f"validation rows: **{'passed' if parity['passed'] else 'failed'}**", "",
             "| export | gated | top-1 agreement | max abs logit diff | mean abs logit diff | greedy exact match | tokenizer | size MB | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in parity["checks"]:
        file = Path(export_dir) / info["files"][c["format"]]
        lines.append(f"| {c['label']} | {'yes' if c['gated'] else 'no (reported)'} | {c['top1_agreement']:.3f} | "
                     f"{c['max_abs_logit_diff']:.4f} | {c['mean_abs_logit_diff']:.5f} | {c['greedy_exact_match']:.3f} | "
                     f"{c['tokenizer_match']:.0%} | {info['size_mb'][c['format']]} | `{file}` |")
    create_markdown_artifact("\n".join(lines), key=f"{artifact_prefix()}-export",
                             description=f"Export: {', '.join(info['files'])} in {export_dir}")


def progress_reporter(max_steps: int) -> Callable[[dict], None]:
    """A progress artifact, and the callback that moves it (called at each logging step, not each step)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(0.0, key=f"{artifact_prefix()}-train-progress",
                                           description=f"Training: step 0 of {max_steps if max_steps > 0 else '?'}")

    def report(p: dict) -> None:
        total = p.get("max_steps") or max_steps
        update_progress_artifact(artifact_id, min(100.0, 100.0 * p["step"] / total),
                                 description=f"Training: step {p['step']} of {total}, loss {p['loss']:.4f}")

    return report


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _losses(train_dir: str) -> list[tuple[int, float]]:
    return [(e["step"], float(e["loss"])) for e in logged_history(train_dir) if "loss" in e and "step" in e]


def loss_curve_svg(points: list[tuple[int, float]], width: int = 560, height: int = 260) -> str:
    """A line chart of (step, loss) as a standalone SVG (no plotting library needed)."""
    pad = 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{line}"/>'
        f'<text x="{pad}" y="{pad - 8}">loss {y1:.3f}</text><text x="{pad}" y="{height - pad + 14}">{y0:.3f}</text>'
        f'<text x="{width - pad}" y="{height - pad + 28}" text-anchor="end">step {x1:g}</text>'
        f'<text x="{pad}" y="{height - pad + 28}">step {x0:g}</text></svg>'
    )
