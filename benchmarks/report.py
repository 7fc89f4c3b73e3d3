"""The markdown table of a benchmark report (benchmarks/run.py), ratios loraflow / baseline."""

from __future__ import annotations

from benchmarks.flops import training_flops


def _ratio(ours: float | None, base: float | None) -> str:
    return f"{ours / base:.2f}x" if ours and base else "–"


def rows_for(d: dict, shape: dict, peak: float) -> list[tuple[str, object, object, str]]:
    b, lf = d["baseline"], d["loraflow"]
    tr, ev, cold, cached = lf["train"], lf["eval"], lf["cold"], lf["cached"]
    mean_target = d["data"]["mean_target_tokens_train"]
    base_flops = training_flops(shape, b["positions_seen"], b["label_positions_seen"], b["attention_square_sum"])
    ours_flops = training_flops(shape, tr["positions_seen"], tr["label_tokens_seen"] if tr["label_only_logits"]
                                else tr["positions_seen"], tr["attention_square_sum"])
    b_fps, o_fps = base_flops / b["train_loop_s"], ours_flops / tr["train_loop_s"]
    tok = lf["tokenize_stats"]["train"]
    stage_sum = sum(cold["timings"]["stages_s"].values())
    overhead = cold["timings"]["flow_s"] - stage_sum
    b_first, o_first = b["first_step_at"] - b["launched_at"], tr["first_step_at"] - cold["launched_at"]
    rows = [
        ("tokenization, examples/s", b["tokenize_examples_per_second"], tok.get("examples_per_second"),
         _ratio(tok.get("examples_per_second"), b["tokenize_examples_per_second"])),
        ("training, examples/s", b["train_examples_per_second"], tr["train_examples_per_second"],
         _ratio(tr["train_examples_per_second"], b["train_examples_per_second"])),
        ("training, target tokens/s", round(b["train_examples_per_second"] * mean_target, 1),
         round(tr["train_examples_per_second"] * mean_target, 1),
         _ratio(tr["train_examples_per_second"], b["train_examples_per_second"])),
        ("training, executed GFLOP/s (% of matmul peak)", f"{b_fps / 1e9:.1f} ({100 * b_fps / peak:.0f}%)",
         f"{o_fps / 1e9:.1f} ({100 * o_fps / peak:.0f}%)", _ratio(o_fps, b_fps)),
        ("training, GFLOP per example", round(base_flops / 1e9 / (b["train_examples_per_second"] * b["train_loop_s"]), 1),
         round(ours_flops / 1e9 / (tr["train_examples_per_second"] * tr["train_loop_s"]), 1), ""),
        ("time to first step, s (from launch)", round(b_first, 1), round(o_first, 1), _ratio(o_first, b_first)),
        ("peak RSS while training, MB", b["train_peak_rss_mb"], tr["peak_rss_mb"], _ratio(tr["peak_rss_mb"], b["train_peak_rss_mb"])),
        ("peak RSS, whole run, MB", b["peak_rss_mb"], cold["peak_rss_mb"], _ratio(cold["peak_rss_mb"], b["peak_rss_mb"])),
    ]
    if b.get("train_peak_gpu_mb") or tr.get("peak_gpu_mb"):
        rows.append(("peak GPU memory while training, MB", b["train_peak_gpu_mb"], tr["peak_gpu_mb"],
                     _ratio(tr["peak_gpu_mb"], b["train_peak_gpu_mb"])))
    rows += [
        ("evaluation, examples/s", b["eval_examples_per_second"], ev["generation_examples_per_second"],
         _ratio(ev["generation_examples_per_second"], b["eval_examples_per_second"])),
        ("ROUGE-L F1 at equal steps", round(100 * b["rouge"]["rougeL_fmeasure"], 2),
         round(100 * ev["finetuned"]["rougeL_fmeasure"], 2), ""),
        ("whole run, cold, s", b["wall_s"], cold["wall_s"], _ratio(cold["wall_s"], b["wall_s"])),
        ("whole run, fully cached rerun, s", "–", cached["wall_s"], f"{100 * cached['wall_s'] / cold['wall_s']:.1f}% of cold"),
        ("orchestration overhead (flow run − Σ stage runs), s", "–", round(overhead, 2),
         f"{100 * overhead / cold['wall_s']:.1f}% of cold"),
        ("process start-up + exit (process wall − flow run), s", "–", round(cold["wall_s"] - cold["timings"]["flow_s"], 1),
         f"{100 * (cold['wall_s'] - cold['timings']['flow_s']) / cold['wall_s']:.1f}% of cold"),
    ]
    return rows


def markdown(report: dict) -> str:
    m, before, after = report["machine"], report["matmul_peaks"], report.get("matmul_peaks_after") or {}
    dtype = m["compute_dtype_auto"]
    peaks = {k: max(before[k], after.get(k, 0)) for k in before}
    peak = peaks[f"{dtype}_gflops"] * 1e9  # the dtype both sides compute in
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(m["cpu_flags"])
    lines = [f"Run {report['date']} on {m['cpu']} (flags: {flags}), {m['cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads){', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; compute dtype "
             f"{dtype}; matmul peak fp32 {peaks['float32_gflops']:.1f}, bf16 {peaks['bfloat16_gflops']:.1f} GFLOP/s.", ""]
    for name, d in report["datasets"].items():
        stats = d["data"]
        lines += [f"**{name}**: {stats['n_train']} train / {stats['n_test']} test examples, mean "
                  f"{stats['mean_tokens_train']} tokens (target {stats['mean_target_tokens_train']}); "
                  f"{report['args']['steps']} steps of batch {report['args']['batch_size']}.", "",
                  "| measure | baseline script | loraflow | loraflow / baseline |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {r} |" for a, b, c, r in rows_for(d, report["model_shape"], peak)]
        lines.append("")
    return "\n".join(lines)
