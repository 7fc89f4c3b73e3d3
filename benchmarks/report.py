"""The tables and the machine-readable summary of a benchmark report (benchmarks/run.py): every measure
per side as the median (min-max) over its repeats, and the ratios loraflow / fair baseline and loraflow / TRL
of those medians."""

from __future__ import annotations

from statistics import median
from typing import Any

from benchmarks.flops import training_flops

# (key, label, digits, higher is better)
MEASURES = [
    ("train_examples_per_s", "training, examples/s", 3, True),
    ("train_gflops_per_s", "training, model GFLOP/s", 1, True),
    ("train_peak_percent", "training, % of the matmul peak (compute dtype)", 0, True),
    ("gflop_per_example", "training, GFLOP per example", 1, False),
    ("time_to_first_step_s", "time to first step, s (from launch)", 1, False),
    ("eval_examples_per_s", "evaluation, examples/s", 3, True),
    ("peak_rss_sum_mb", "peak RSS summed over the run's processes, MB", 0, False),
    ("largest_process_rss_mb", "largest single process's peak RSS, MB", 0, False),
    ("rougeL", "ROUGE-L F1 (x100) at equal steps", 2, True),
    ("stop_rate", "predictions ending on a stop token", 2, True),
    ("mean_prediction_words", "mean prediction length, words", 1, None),
    ("wall_s", "whole run, cold, s", 1, False),
]


def measures(side: str, run: dict[str, Any], shape: dict, peak: float) -> dict[str, float]:
    """One run's measures, whichever side it is."""
    if side == "loraflow":
        tr, ev, cold = run["train"], run["eval"], run["cold"]
        flops = training_flops(shape, tr["positions_seen"], tr["label_tokens_seen"] if tr["label_only_logits"]
                               else tr["positions_seen"], tr["attention_square_sum"])
        out = {"train_examples_per_s": tr["train_examples_per_second"], "train_loop_s": tr["train_loop_s"],
               "examples": tr["train_examples_per_second"] * tr["train_loop_s"],
               "time_to_first_step_s": tr["first_step_at"] - cold["launched_at"],
               "eval_examples_per_s": ev["generation_examples_per_second"],
               "peak_rss_sum_mb": cold["peak_rss_sum_mb"], "largest_process_rss_mb": cold["largest_process_rss_mb"],
               "rougeL": 100 * ev["finetuned"]["rougeL_fmeasure"], "stop_rate": None,
               "mean_prediction_words": run["mean_prediction_words"], "wall_s": cold["wall_s"],
               "cached_wall_s": run["cached"]["wall_s"],
               "overhead_s": cold["timings"]["flow_s"] - sum(cold["timings"]["stages_s"].values())}
    else:
        flops = training_flops(shape, run["positions_seen"], run["label_positions_seen"], run["attention_square_sum"])
        out = {"train_examples_per_s": run["train_examples_per_second"], "train_loop_s": run["train_loop_s"],
               "examples": run["train_examples_per_second"] * run["train_loop_s"],
               "time_to_first_step_s": run["first_step_at"] - run["launched_at"],
               "eval_examples_per_s": run["eval_examples_per_second"], "peak_rss_sum_mb": run["peak_rss_sum_mb"],
               "largest_process_rss_mb": run["largest_process_rss_mb"], "rougeL": 100 * run["rouge"]["rougeL_fmeasure"],
               "stop_rate": run["stop_rate"], "mean_prediction_words": run["mean_prediction_words"],
               "wall_s": run["wall_s"]}
    out["train_gflops_per_s"] = flops / 1e9 / out["train_loop_s"]
    out["train_peak_percent"] = 100 * flops / out["train_loop_s"] / peak
    out["gflop_per_example"] = flops / 1e9 / out["examples"]
    return out


def spread(values: list[float | None]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)} if values else None


def side_table(d: dict, shape: dict, peak: float) -> dict[str, dict[str, dict | None]]:
    """{side: {measure: spread}} for every side present in dataset `d`."""
    out = {}
    for side in ("baseline", "baseline-naive", "trl", "loraflow"):
        runs = [measures(side, r, shape, peak) for r in d.get(side, [])]
        if runs:
            out[side] = {k: spread([r.get(k) for r in runs]) for k in runs[0]}
    return out


def _peak(report: dict) -> float:
    m, before, after = report["machine"], report["matmul_peaks"], report.get("matmul_peaks_after") or {}
    dtype = m["compute_dtype_auto"]
    return max(before[f"{dtype}_gflops"], after.get(f"{dtype}_gflops", 0)) * 1e9  # the dtype every side computes in


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not a.get(key) or not b.get(key) or not b[key]["median"]:
        return None
    return round(a[key]["median"] / b[key]["median"], 3)


def paired(d: dict, a: str, b: str) -> dict | None:
    """Paired cluster-bootstrap 95% interval of ROUGE-L F1 (x100), side `a` - side `b`, on the same test rows
    (their first runs: every side decodes greedily, so its repeats give the same predictions)."""
    from loraflow.bootstrap import paired_bootstrap
    from loraflow.rouge import per_example

    if not d.get(a) or not d.get(b) or "references" not in d or "predictions" not in d[a][0]:
        return None
    refs = d["references"]
    rows = {side: per_example(d[side][0]["predictions"], refs)["rougeL_fmeasure"] for side in (a, b)}
    out = paired_bootstrap(rows[a], rows[b], d.get("clusters"), samples=2000, seed=0)
    return {"mean_diff": round(100 * out["mean_diff"], 2), "ci95": [round(100 * x, 2) for x in out["ci95"]],
            "n": out["n"], "n_clusters": out["n_clusters"]}


def summary(report: dict) -> dict:
    """benchmarks/results/summary.json: per dataset, the ratios of medians the docs quote."""
    out: dict[str, Any] = {"date": report["date"], "machine": report["machine"]["cpu"],
                           "compute_dtype": report["machine"]["compute_dtype_auto"]}
    for name, d in report["datasets"].items():
        t = side_table(d, report["model_shape"], _peak(report))
        lf, base, trl = t.get("loraflow"), t.get("baseline"), t.get("trl")
        out[name] = {
            "repeats": d.get("repeats"),
            "loraflow_over_baseline": {k: _ratio(lf, base, k) for k in
                                       ("train_examples_per_s", "eval_examples_per_s", "time_to_first_step_s",
                                        "peak_rss_sum_mb")},
            "loraflow_over_trl": {k: _ratio(lf, trl, k) for k in
                                  ("train_examples_per_s", "eval_examples_per_s", "peak_rss_sum_mb")},
            "baseline_stop_rate": base["stop_rate"]["median"] if base else None,
            "naive_baseline_stop_rate": t["baseline-naive"]["stop_rate"]["median"] if "baseline-naive" in t else None,
            "rougeL": {side: round(t[side]["rougeL"]["median"], 2) for side in t},
            "rougeL_loraflow_minus_baseline": paired(d, "loraflow", "baseline"),
            "rougeL_loraflow_minus_trl": paired(d, "loraflow", "trl"),
        }
    return out


def _cell(s: dict | None, digits: int) -> str:
    if not s:
        return "–"
    med = f"{s['median']:.{digits}f}"
    return med if s["n"] == 1 or s["min"] == s["max"] else f"{med} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(report: dict) -> str:
    m, before, after = report["machine"], report["matmul_peaks"], report.get("matmul_peaks_after") or {}
    peaks = {k: max(before[k], after.get(k, 0)) for k in before}
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(m["cpu_flags"])
    lines = [f"Run {report['date']} on {m['cpu']} (flags: {flags}), {m['cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads){', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; compute dtype "
             f"{m['compute_dtype_auto']} on every side; matmul peak fp32 {peaks['float32_gflops']:.1f}, bf16 "
             f"{peaks['bfloat16_gflops']:.1f} GFLOP/s.", ""]
    for name, d in report["datasets"].items():
        stats, t = d["data"], side_table(d, report["model_shape"], _peak(report))
        lines += [f"**{name}**: {stats['n_train']} train / {stats['n_test']} test examples, mean "
                  f"{stats['mean_tokens_train']} tokens (target {stats['mean_target_tokens_train']}); "
                  f"{report['args']['steps']} steps of batch {report['args']['batch_size']}; median (min–max) of "
                  f"{d.get('repeats')} alternating runs per side (the naive baseline: one).", "",
                  "| measure | baseline (fair) | TRL SFTTrainer | loraflow | loraflow / baseline | loraflow / TRL "
                  "| naive baseline |", "|---|---|---|---|---|---|---|"]
        for key, label, digits, _ in MEASURES:
            lf, base, trl, naive = (t.get(s, {}).get(key) for s in ("loraflow", "baseline", "trl", "baseline-naive"))
            r_base, r_trl = _ratio(t.get("loraflow"), t.get("baseline"), key), _ratio(t.get("loraflow"), t.get("trl"), key)
            lines.append(f"| {label} | {_cell(base, digits)} | {_cell(trl, digits)} | {_cell(lf, digits)} | "
                         f"{f'{r_base:.2f}x' if r_base else '–'} | {f'{r_trl:.2f}x' if r_trl else '–'} | "
                         f"{_cell(naive, digits)} |")
        for other, label in (("baseline", "fair baseline"), ("trl", "TRL")):
            p = paired(d, "loraflow", other)
            if p:
                lines.append(f"| ROUGE-L, loraflow − {label}, paired 95% interval (n={p['n']}, {p['n_clusters']} "
                             f"clusters) | | | {p['mean_diff']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | | | |")
        lf = t.get("loraflow", {})
        if lf:
            lines.append(f"| whole run, fully cached rerun, s | – | – | {_cell(lf['cached_wall_s'], 1)} | "
                         f"{100 * lf['cached_wall_s']['median'] / lf['wall_s']['median']:.1f}% of cold | – | – |")
            lines.append(f"| orchestration overhead (flow run − Σ stage runs), s | – | – | {_cell(lf['overhead_s'], 2)} "
                         "| – | – | – |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.report RESULTS.json`: the tables and summary.json again from a run's results."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path)
    a = p.parse_args(argv)
    report = json.loads(a.results.read_text())
    (a.results.parent / "summary.json").write_text(json.dumps(summary(report), indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
