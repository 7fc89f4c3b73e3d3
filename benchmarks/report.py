"""The tables and the machine-readable summary of a benchmark report (benchmarks/run.py): every measure
per side as the median (min-max) over its runs (one per training seed; ROUGE-L as the mean over seeds), the
ratios loraflow / fair baseline and loraflow / TRL of those medians, and ROUGE-L compared by a two-level paired
bootstrap over seeds and test rows."""

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
    ("time_to_loop_s", "time to the training loop, s (from launch)", 1, False),
    ("first_step_s", "the first step itself, s (loraflow's holds the run's longest example)", 1, False),
    ("eval_examples_per_s", "evaluation, examples/s", 3, True),
    ("peak_rss_sum_mb", "peak RSS summed over the run's processes, MB", 0, False),
    ("largest_process_rss_mb", "largest single process's peak RSS, MB", 0, False),
    ("rougeL", "ROUGE-L F1 (x100) at equal steps: mean (min–max) over seeds", 2, True),
    ("stop_rate", "predictions ending on a stop token", 2, True),
    ("mean_prediction_words", "mean prediction length, words", 1, None),
    ("wall_s", "whole run, cold, s", 1, False),
]


MIN_SAMPLE_HZ = 10  # `rss.TreeSampler` samples at 20 Hz: a run sampled below this lost its memory reading


def memory_peak(side: str, run: dict[str, Any]) -> float | None:
    """A run's peak RSS summed over its processes (loraflow's from its cold run), MB; None when its sampler
    stopped early and saw only part of the run."""
    memory = run["cold"] if side == "loraflow" else run
    return memory["peak_rss_sum_mb"] if memory.get("sample_hz", MIN_SAMPLE_HZ) >= MIN_SAMPLE_HZ else None


def measures(side: str, run: dict[str, Any], shape: dict, peak: float) -> dict[str, float]:
    """One run's measures, whichever side it is."""
    if side == "loraflow":
        tr, ev, cold = run["train"], run["eval"], run["cold"]
        flops = training_flops(shape, tr["positions_seen"], tr["label_tokens_seen"] if tr["label_only_logits"]
                               else tr["positions_seen"], tr["attention_square_sum"])
        out = {"train_examples_per_s": tr["train_examples_per_second"], "train_loop_s": tr["train_loop_s"],
               "examples": tr["train_examples_per_second"] * tr["train_loop_s"],
               "eval_examples_per_s": ev["generation_examples_per_second"],
               "peak_rss_sum_mb": cold["peak_rss_sum_mb"], "largest_process_rss_mb": cold["largest_process_rss_mb"],
               "rougeL": 100 * ev["finetuned"]["rougeL_fmeasure"], "stop_rate": None,
               "mean_prediction_words": run["mean_prediction_words"], "wall_s": cold["wall_s"],
               "cached_wall_s": run["cached"]["wall_s"],
               "overhead_s": cold["timings"]["flow_s"] - sum(cold["timings"]["stages_s"].values())}
        launched, first = cold["launched_at"], tr["first_step_at"]
        began = (tr.get("process") or {}).get("loop_began_at")
    else:
        flops = training_flops(shape, run["positions_seen"], run["label_positions_seen"], run["attention_square_sum"])
        out = {"train_examples_per_s": run["train_examples_per_second"], "train_loop_s": run["train_loop_s"],
               "examples": run["train_examples_per_second"] * run["train_loop_s"],
               "eval_examples_per_s": run["eval_examples_per_second"], "peak_rss_sum_mb": run["peak_rss_sum_mb"],
               "largest_process_rss_mb": run["largest_process_rss_mb"], "rougeL": 100 * run["rouge"]["rougeL_fmeasure"],
               "stop_rate": run["stop_rate"], "mean_prediction_words": run["mean_prediction_words"],
               "wall_s": run["wall_s"]}
        launched, began, first = run["launched_at"], run.get("loop_began_at"), run["first_step_at"]
    if memory_peak(side, run) is None:  # the sampler stopped early: neither memory reading holds
        out["peak_rss_sum_mb"] = out["largest_process_rss_mb"] = None
    out["time_to_first_step_s"] = first - launched
    out["time_to_loop_s"] = began - launched if began else None  # None: recorded before 2026-12-04's second run
    out["first_step_s"] = first - began if began else None
    out["train_gflops_per_s"] = flops / 1e9 / out["train_loop_s"]
    out["train_peak_percent"] = 100 * flops / out["train_loop_s"] / peak
    out["gflop_per_example"] = flops / 1e9 / out["examples"]
    return out


def spread(values: list[float | None]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    return ({"median": median(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values),
             "n": len(values)} if values else None)


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


def by_seed(d: dict, side: str) -> dict[int, list[float]]:
    """{training seed: per-test-row ROUGE-L F1 (x1)} of `side`'s runs."""
    from loraflow.metrics.rouge import per_example

    side_runs = d.get(side, [])
    if side_runs and all("seed" not in r for r in side_runs):  # a report from before seeds: repeats of one seed
        side_runs = [{**side_runs[0], "seed": 0}]
    return {r["seed"]: per_example(r["predictions"], d["references"])["rougeL_fmeasure"] for r in side_runs}


def paired(d: dict, a: str, b: str) -> dict | None:
    """ROUGE-L F1 (x100) of side `a` - side `b`: the mean over the seeds both ran and the test rows, with a 95%
    interval from the two-level paired bootstrap (seeds, then test clusters; `seeded_paired_bootstrap`)."""
    from loraflow.metrics.bootstrap import seeded_paired_bootstrap

    if not d.get(a) or not d.get(b) or "references" not in d:
        return None
    rows_a, rows_b = by_seed(d, a), by_seed(d, b)
    seeds = [s for s in rows_a if s in rows_b]
    if not seeds:
        return None
    out = seeded_paired_bootstrap([rows_a[s] for s in seeds], [rows_b[s] for s in seeds], d.get("clusters"),
                                  samples=2000, seed=0)
    return {"mean_diff": round(100 * out["mean_diff"], 2), "ci95": [round(100 * x, 2) for x in out["ci95"]],
            "seeds": out["seeds"], "n": out["n"], "n_clusters": out["n_clusters"]}


def runs(d: dict, side: str, report: dict) -> list[dict[str, float]]:
    return [measures(side, r, report["model_shape"], _peak(report)) for r in d.get(side, [])]


def summary(report: dict) -> dict:
    """benchmarks/results/summary.json: per dataset, the ratios of medians and the ROUGE-L comparisons the docs quote."""
    out: dict[str, Any] = {"date": report["date"], "machine": report["machine"]["cpu"],
                           "compute_dtype": report["machine"]["compute_dtype_auto"],
                           "bf16_autocast": report["machine"].get("bf16_autocast_auto")}
    for name, d in report["datasets"].items():
        t = side_table(d, report["model_shape"], _peak(report))
        lf, base, trl = t.get("loraflow"), t.get("baseline"), t.get("trl")
        out[name] = {
            "seeds": d.get("seeds"),
            "n_test": len(d.get("references", [])),
            "loraflow_over_baseline": {k: _ratio(lf, base, k) for k in
                                       ("train_examples_per_s", "eval_examples_per_s", "time_to_first_step_s",
                                        "time_to_loop_s", "first_step_s", "peak_rss_sum_mb")},
            "loraflow_over_trl": {k: _ratio(lf, trl, k) for k in
                                  ("train_examples_per_s", "eval_examples_per_s", "time_to_first_step_s",
                                   "time_to_loop_s", "first_step_s", "peak_rss_sum_mb")},
            "baseline_stop_rate": base["stop_rate"]["median"] if base else None,
            "naive_baseline_stop_rate": t["baseline-naive"]["stop_rate"]["median"] if "baseline-naive" in t else None,
            "rougeL": {side: round(t[side]["rougeL"]["mean"], 2) for side in t},  # mean over seeds
            "rougeL_by_seed": {side: [round(m["rougeL"], 2) for m in runs(d, side, report)] for side in t},
            "rougeL_vs_baseline": paired(d, "loraflow", "baseline"),
            "rougeL_vs_trl": paired(d, "loraflow", "trl"),
        }
        like = like_for_like(d)
        if like:
            out[name]["like_for_like_peak_rss_sum_mb"] = like
            out[name]["loraflow_over_trl_like_for_like"] = {
                f"peak_rss_sum_mb_checkpointing_{s}": _share(like[s], "loraflow", "trl") for s in like}
            out[name]["loraflow_over_baseline_like_for_like"] = {
                f"peak_rss_sum_mb_checkpointing_{s}": _share(like[s], "loraflow", "baseline") for s in like}
    return out


def like_for_like(d: dict) -> dict[str, dict[str, float]]:
    """{"on"|"off": {side: mean peak RSS summed over the run's processes, MB}}: every side with gradient
    checkpointing forced on, then off (`benchmarks.run --like-for-like`)."""
    def peaks(side: str, rs: list[dict]) -> list[float]:
        return [p for r in rs if (p := memory_peak(side, r)) is not None]

    return {setting: {side: round(sum(p) / len(p), 1) for side, rs in sides.items() if (p := peaks(side, rs))}
            for setting, sides in (d.get("like_for_like") or {}).items()}


def _share(row: dict[str, float], a: str, b: str) -> float | None:
    return round(row[a] / row[b], 3) if row.get(a) and row.get(b) else None


def losses(d: dict) -> list[str]:
    """Per-step training loss of each side, the mean over its seeds, side by side (markdown rows)."""
    curves = {side: [r["losses"] for r in d.get(side, []) if r.get("losses")] for side in ("baseline", "trl", "loraflow")}
    steps = max((len(c) for side_curves in curves.values() for c in side_curves), default=0)
    if not steps:
        return []

    def cell(side: str, i: int) -> str:
        values = [c[i] for c in curves[side] if i < len(c)]
        return f"{sum(values) / len(values):.3f}" if values else "–"

    lines = ["| step | baseline (fair) | TRL SFTTrainer | loraflow |", "|---|---|---|---|"]
    return lines + [f"| {i + 1} | {cell('baseline', i)} | {cell('trl', i)} | {cell('loraflow', i)} |" for i in range(steps)]


def timeline(run: dict) -> list[tuple[str, float, float | None]]:
    """A loraflow cold run as (what, start, end) in seconds from its launch: the flow run, each stage's task run,
    the training process (started, its imports done, the model stage asked of it, the train request) and the end of
    the first training step. Empty for a run recorded before the timeline was (2026-12-04)."""
    cold, tr = run["cold"], run["train"]
    at = cold["timings"].get("stages_at")
    if not at:
        return []
    t0, process = cold["launched_at"], tr.get("process") or {}
    rows = [("flow run", *cold["timings"]["flow_at"])]
    rows += [(f"stage: {stage}", *span) for stage, span in sorted(at.items(), key=lambda kv: kv[1][0])]
    marks = [("training process: started", "started_at"), ("training process: imports done", "imported_at"),
             ("training process: model stage asked of it", "model_request_at"),
             ("training process: train request", "request_at"), ("training process: model ready", "model_ready_at"),
             ("training process: Trainer built", "trainer_built_at"), ("training process: loop began", "loop_began_at")]
    rows += [(what, process[k], None) for what, k in marks if process.get(k)]
    rows.append(("first training step done", tr["first_step_at"], None))
    rows.sort(key=lambda r: r[1])
    return [(what, start - t0, None if end is None else end - t0) for what, start, end in rows]


def _cell(s: dict | None, digits: int, center: str = "median") -> str:
    if not s:
        return "–"
    mid = f"{s[center]:.{digits}f}"
    return mid if s["n"] == 1 or s["min"] == s["max"] else f"{mid} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _autocast(report: dict) -> str:
    """How the sides trained in their compute dtype (bf16 autocast since 2026-12-06; unrecorded before, when no side
    autocast on a CPU); the script's and TRL's unless forced (`--peer-bf16`) as loraflow's."""
    on = report["machine"].get("bf16_autocast_auto")
    if on is None:
        return ""
    forced = report["args"].get("peer_bf16", "auto")
    peers = on if forced == "auto" else forced == "on"
    word = lambda v: "with bf16 autocast" if v else "without autocast"  # noqa: E731
    return f", {word(on)}" if peers == on else f"; loraflow {word(on)}, the script and TRL {word(peers)}"


def markdown(report: dict) -> str:
    m, before, after = report["machine"], report["matmul_peaks"], report.get("matmul_peaks_after") or {}
    peaks = {k: max(before[k], after.get(k, 0)) for k in before}
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(m["cpu_flags"])
    lines = [f"Run {report['date']} on {m['cpu']} (flags: {flags}), {m['cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads){', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; compute dtype "
             f"{m['compute_dtype_auto']} on every side{_autocast(report)}; matmul peak fp32 {peaks['float32_gflops']:.1f}, bf16 "
             f"{peaks['bfloat16_gflops']:.1f} GFLOP/s.", ""]
    for name, d in report["datasets"].items():
        stats, t = d["data"], side_table(d, report["model_shape"], _peak(report))
        seeds = ", ".join(map(str, d["seeds"])) if d.get("seeds") else f"one ({d.get('repeats')} repeats)"
        lines += [f"**{name}**: {stats['n_train']} train / {stats['n_test']} test examples, mean "
                  f"{stats['mean_tokens_train']} tokens (target {stats['mean_target_tokens_train']}); "
                  f"{report['args']['steps']} steps of batch {report['args']['batch_size']}; training seeds "
                  f"{seeds}, one alternating run per side and seed"
                  f"{' (the naive baseline: one)' if d.get('baseline-naive') else ''}; median (min–max) over the runs, "
                  "ROUGE-L the mean.", "",
                  "| measure | baseline (fair) | TRL SFTTrainer | loraflow | loraflow / baseline | loraflow / TRL "
                  "| naive baseline |", "|---|---|---|---|---|---|---|"]
        for key, label, digits, _ in MEASURES:
            lf, base, trl, naive = (t.get(s, {}).get(key) for s in ("loraflow", "baseline", "trl", "baseline-naive"))
            r_base, r_trl = _ratio(t.get("loraflow"), t.get("baseline"), key), _ratio(t.get("loraflow"), t.get("trl"), key)
            center = "mean" if key == "rougeL" else "median"
            base, trl, lf, naive = (_cell(x, digits, center) for x in (base, trl, lf, naive))
            lines.append(f"| {label} | {base} | {trl} | {lf} | "
                         f"{f'{r_base:.2f}x' if r_base else '–'} | {f'{r_trl:.2f}x' if r_trl else '–'} | "
                         f"{naive} |")
        for other, label in (("baseline", "fair baseline"), ("trl", "TRL")):
            p = paired(d, "loraflow", other)
            if p:
                lines.append(f"| ROUGE-L, loraflow − {label}, 95% interval over seeds and rows ({p['seeds']} seeds, "
                             f"n={p['n']}, {p['n_clusters']} clusters) | | | {p['mean_diff']:+.2f} "
                             f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | | | |")
        lf = t.get("loraflow", {})
        if lf:
            lines.append(f"| whole run, fully cached rerun, s | – | – | {_cell(lf['cached_wall_s'], 1)} | "
                         f"{100 * lf['cached_wall_s']['median'] / lf['wall_s']['median']:.1f}% of cold | – | – |")
            lines.append(f"| orchestration overhead (flow run − Σ stage runs), s | – | – | {_cell(lf['overhead_s'], 2)} "
                         "| – | – | – |")
        like = like_for_like(d)
        if like:
            n = min(len(rs) for sides in d["like_for_like"].values() for rs in sides.values() if rs)
            lines += ["", f"{name}: like-for-like memory, peak RSS summed over the run's processes, MB (mean of {n} "
                      "seed(s)), gradient checkpointing forced on every side:", "",
                      "| checkpointing | baseline (fair) | TRL SFTTrainer | loraflow | loraflow / baseline | loraflow / TRL |",
                      "|---|---|---|---|---|---|"]
            for setting, row in like.items():
                r_base, r_trl = _share(row, "loraflow", "baseline"), _share(row, "loraflow", "trl")
                lines.append(f"| {setting} | {row.get('baseline', '–')} | {row.get('trl', '–')} | {row.get('loraflow', '–')} "
                             f"| {f'{r_base:.2f}x' if r_base else '–'} | {f'{r_trl:.2f}x' if r_trl else '–'} |")
        steps = timeline(d["loraflow"][0]) if d.get("loraflow") else []
        if steps:
            lines += ["", f"{name}: loraflow's cold run (seed {d['loraflow'][0]['seed']}), s from launch:", "",
                      "| what | start | end |", "|---|---|---|",
                      *(f"| {what} | {start:.1f} | {'' if end is None else f'{end:.1f}'} |" for what, start, end in steps)]
        curve = losses(d)
        if curve:
            lines += ["", f"{name}: training loss per step, mean over seeds:", "", *curve]
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
