"""The benchmark's FLOP count agrees with torch's own FLOP counter on a real model, forward and backward."""

import pytest
import torch

from benchmarks.flops import forward_flops, model_shape, training_flops
from loraflow.stages.train.collators import CompletionCollator
from loraflow.stages.train.trainer import body_and_head


def test_analytic_forward_flops_match_torch_flop_counter(tiny_llama_dir):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    batch = CompletionCollator(pad_token_id=0)([
        {"input_ids": list(range(10, 40)), "labels": [-100] * 25 + list(range(35, 40))},
        {"input_ids": list(range(10, 30)), "labels": [-100] * 12 + list(range(22, 30))},
    ])
    rows, length = batch["input_ids"].shape
    shape = model_shape(tiny_llama_dir)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    expected = training_flops(shape, rows * length, rows * length, rows * length**2, lora_rank=0) / 2
    assert abs(counter.get_total_flops() - expected) / expected < 0.01

    body, head = body_and_head(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        head(hidden[:, :-1][batch["labels"][:, 1:] != -100])
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    expected = training_flops(shape, rows * length, n_labels, rows * length**2, lora_rank=0) / 2
    assert abs(counter.get_total_flops() - expected) / expected < 0.01


@pytest.mark.parametrize("inputs_require_grad", [False, True])
def test_analytic_training_flops_match_torch_flop_counter_forward_and_backward(tiny_llama_dir, inputs_require_grad):
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    if inputs_require_grad:  # what gradient checkpointing turns on (prepare_model_for_kbit_training)
        model.enable_input_require_grads()
    ids = torch.randint(10, 200, (2, 96))
    body, head = body_and_head(model)
    with FlopCounterMode(display=False) as counter:
        hidden = body(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        head(hidden[:, -3:]).logsumexp(-1).mean().backward()  # the LM head at 3 positions a row: the body dominates
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    shape = model_shape(tiny_llama_dir)
    rows, length = ids.shape
    expected = training_flops(shape, rows * length, rows * 3, rows * length**2, lora_rank=4,
                              inputs_require_grad=inputs_require_grad)
    parts = forward_flops(shape, rows * length, rows * 3, rows * length**2, lora_rank=4)
    assert parts["attention"] > 0.05 * expected  # so a wrong attention factor shows
    # torch also counts the fused SDPA backward's recomputation of QK^T (half the attention forward): executed,
    # but not model FLOPs, which is what utilization is read against
    counted = expected + parts["attention"] / 2
    assert abs(counter.get_total_flops() - counted) / counted < 0.01, (counter.get_total_flops(), counted)


def test_the_rss_sampler_sums_a_process_tree_at_10_hz_or_more(tmp_path):
    """A parent holding ~150 MB starts a child holding ~250 MB: the summed peak sees both at once."""
    import subprocess
    import sys

    from benchmarks.rss import TreeSampler

    child = "import time; b = bytearray(250 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    parent = ("import subprocess, sys, time; a = bytearray(150 << 20); a[::4096] = b'y' * len(a[::4096]); "
              f"subprocess.run([sys.executable, '-c', {child!r}]); time.sleep(0.3)")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    sampler = TreeSampler(proc.pid).start()
    proc.wait(timeout=60)
    got = sampler.stop()
    assert got["sample_hz"] >= 10
    peaks = sorted(p["peak_rss_mb"] for p in got["processes"])
    assert len(peaks) == 2 and 250 <= peaks[-1] < 300 and 150 <= peaks[0] < 200, got
    assert got["peak_rss_sum_mb"] >= 400 > max(peaks), got  # more than the largest single process


def test_the_rss_sampler_goes_on_when_a_process_ends_between_its_memory_and_its_name(monkeypatch):
    """The 2026-12-05 run lost a run's memory so: a process ended after its RSS was read and before its name was,
    the sampler's thread died, and the run recorded 538 MB at 0.1 Hz. The race is the OS's, so it is forced here:
    the name of the real child process is unreadable as if it had just ended."""
    import subprocess
    import sys

    import psutil

    from benchmarks.rss import TreeSampler

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sampler = TreeSampler(proc.pid)

        def ended(self):
            raise psutil.NoSuchProcess(self.pid)

        monkeypatch.setattr(psutil.Process, "name", ended)
        sampler._sample()
        monkeypatch.undo()
        sampler._sample()
        assert sampler.samples == 2 and sampler.peak_sum > 0
    finally:
        proc.kill()
        proc.wait()


def test_a_run_whose_memory_was_sampled_below_10_hz_has_no_like_for_like_peak():
    """A sampler that stopped early saw a fraction of the run: its peak is left out, not averaged in."""
    from benchmarks.report import like_for_like

    like = {"off": {"baseline": [{"peak_rss_sum_mb": 537.8, "sample_hz": 0.1}],
                    "trl": [{"peak_rss_sum_mb": 5000.0, "sample_hz": 19.2}, {"peak_rss_sum_mb": 900.0, "sample_hz": 2.0}],
                    "loraflow": [{"cold": {"peak_rss_sum_mb": 4500.0, "sample_hz": 19.0}}]}}
    assert like_for_like({"like_for_like": like}) == {"off": {"trl": 5000.0, "loraflow": 4500.0}}


def test_a_run_whose_memory_was_sampled_below_10_hz_has_no_peak_in_the_tables():
    """The same rule for every row: the run that lost its reading (in the committed 2026-12-05 results) has no peak,
    the run beside it keeps its own."""
    import json
    from pathlib import Path

    from benchmarks.report import _peak, measures

    report = json.loads((Path(__file__).parents[1] / "benchmarks/results/2026-12-05.json").read_text())
    off = report["datasets"]["aclsum"]["like_for_like"]["off"]
    lost, kept = (measures(side, off[side][0], report["model_shape"], _peak(report)) for side in ("baseline", "trl"))
    assert off["baseline"][0]["sample_hz"] < 10 and lost["peak_rss_sum_mb"] is None
    assert kept["peak_rss_sum_mb"] == off["trl"][0]["peak_rss_sum_mb"] > 5000


def test_the_report_pairs_sides_by_training_seed_and_keeps_the_seed_spread():
    """ROUGE-L comparisons pair each loraflow seed with the same seed of the other side; a side that wins with
    one seed and loses with another gets an interval that spans both."""
    from benchmarks.report import losses, paired

    refs = [[f"the model summarises paper {i} well"] for i in range(12)]
    good = [r[0] for r in refs]
    bad = [f"nothing about {i}" for i in range(12)]
    d = {"references": refs, "clusters": [str(i // 2) for i in range(12)],
         "baseline": [{"seed": s, "predictions": good if s != 1 else bad, "losses": [3.0, 2.0]} for s in (0, 1, 2)],
         "loraflow": [{"seed": s, "predictions": bad if s != 1 else good, "losses": [3.0, 1.5, 1.0]} for s in (2, 1, 0)]}
    p = paired(d, "loraflow", "baseline")
    assert p["seeds"] == 3 and p["n"] == 12 and p["n_clusters"] == 6
    assert p["mean_diff"] < 0 and p["ci95"][0] < p["mean_diff"] < p["ci95"][1] and p["ci95"][1] > 0
    d["loraflow"] = [{"seed": s, "predictions": good} for s in (0, 1, 2)]  # same seeds, loraflow right every time
    d["baseline"] = [{"seed": s, "predictions": good if s == 1 else bad} for s in (0, 1, 2)]
    assert paired(d, "loraflow", "baseline")["ci95"][0] >= 0
    table = losses({"baseline": [{"losses": [3.0, 2.0]}], "loraflow": [{"losses": [3.0, 1.0]}, {"losses": [2.0, 2.0]}]})
    assert table[2:] == ["| 1 | 3.000 | – | 2.500 |", "| 2 | 2.000 | – | 1.500 |"]


def test_the_like_for_like_memory_rows_are_per_setting_means_and_ratios():
    """`benchmarks.run --like-for-like`: each side's peak summed RSS with checkpointing forced on, then off, averaged
    over its seeds; summary.json holds loraflow ÷ TRL per setting (loraflow's from its cold run)."""
    from benchmarks.report import like_for_like, summary

    like = {"on": {"baseline": [{"peak_rss_sum_mb": 3000.0}, {"peak_rss_sum_mb": 3200.0}],
                   "trl": [{"peak_rss_sum_mb": 2000.0}, {"peak_rss_sum_mb": 2200.0}],
                   "loraflow": [{"cold": {"peak_rss_sum_mb": 2100.0}}, {"cold": {"peak_rss_sum_mb": 2100.0}}]},
            "off": {"baseline": [{"peak_rss_sum_mb": 6000.0}], "trl": [{"peak_rss_sum_mb": 5000.0}],
                    "loraflow": [{"cold": {"peak_rss_sum_mb": 5500.0}}]}}
    assert like_for_like({"like_for_like": like}) == {"on": {"baseline": 3100.0, "trl": 2100.0, "loraflow": 2100.0},
                                                      "off": {"baseline": 6000.0, "trl": 5000.0, "loraflow": 5500.0}}
    report = {"date": "2026-12-04", "machine": {"cpu": "x", "compute_dtype_auto": "bfloat16"}, "model_shape": {},
              "matmul_peaks": {"bfloat16_gflops": 1.0}, "datasets": {"aclsum": {"like_for_like": like}}}
    out = summary(report)["aclsum"]
    assert out["loraflow_over_trl_like_for_like"] == {"peak_rss_sum_mb_checkpointing_on": 1.0,
                                                      "peak_rss_sum_mb_checkpointing_off": 1.1}
    assert out["loraflow_over_baseline_like_for_like"]["peak_rss_sum_mb_checkpointing_on"] == round(2100 / 3100, 3)
    assert "like_for_like_peak_rss_sum_mb" not in summary({**report, "datasets": {"aclsum": {}}})["aclsum"]


def test_the_memory_breakdown_measures_every_phase_and_kind_of_a_real_training_process(tmp_path, tiny_llama_dir):
    """`benchmarks.memory`'s training process: the real train stage on the tiny model (NF4, 3 steps) with the phase
    callback; every phase is marked in order, each kind is counted, and the peak is the largest phase's."""
    import json
    import subprocess
    import sys

    from benchmarks.data import REPO
    from loraflow.hardware import resolve
    from test_flow_e2e import tiny_config
    from tests_support import build_model, prepare_data, tokenize_data, train_key, write_examples

    cfg = resolve(tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=3,
                              save_steps=3, gradient_checkpointing=True))
    out = tmp_path / "runs"
    data = prepare_data(cfg.data, out)
    tokenized = tokenize_data(data, cfg.prompt, cfg.model, out)
    model = build_model(cfg.model, cfg.quantization, cfg.lora, out)
    request = {"cfg": cfg.model_dump(mode="json"), "tokenized": tokenized.model_dump(), "model": model.model_dump(),
               "output_dir": str(tmp_path / "train"), "key": {"stage": "train", "parts": train_key(cfg, tokenized, model).parts},
               "checkpointing": "on"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", "train", json.dumps(request)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert [p["phase"] for p in run["phases"]] == [
        "Python and the libraries imported", "model loaded, Trainer built", "step 1: forward", "step 1: backward",
        "step 1: optimizer step", "steps 2 and later", "after the last step (evaluation, saving)"]
    assert run["peak_rss_mb"] == max(p["peak"] for p in run["phases"]) > run["phases"][0]["end"] > 0
    kinds = run["kinds_bytes"]
    for kind in ("frozen weights, 4-bit packed", "LoRA weights", "LoRA gradients", "optimizer state",
                 "saved for backward (activations)", "logits (the LM head's output)"):
        assert kinds[kind] > 0, (kind, kinds)
    assert kinds["LoRA gradients"] == kinds["LoRA weights"] and kinds["optimizer state"] >= 2 * kinds["LoRA weights"]
    assert run["train_metrics"]["gradient_checkpointing"] is True and run["preflight_estimate_mb"] > 0
    assert [row["step"] for row in run["steps"]] == [1, 2, 3]  # what grows over a long run, step by step
    assert all(0 < row["rss_mb"] <= run["peak_rss_mb"] for row in run["steps"])
    assert all(row["heap_in_use_mb"] is None or 0 < row["heap_in_use_mb"] < row["rss_mb"] for row in run["steps"])


def test_the_cold_run_timeline_orders_stages_and_the_training_process_from_launch():
    from benchmarks.report import timeline

    t0 = 0.0  # seconds since the epoch, in a real run
    run = {"cold": {"launched_at": t0, "timings": {"flow_at": [t0 + 2, t0 + 60], "stages_at": {
               "train": [t0 + 14, t0 + 40], "preflight": [t0 + 3, t0 + 9], "model": [t0 + 11, t0 + 13]}}},
           "train": {"first_step_at": t0 + 23, "process": {"started_early": True, "started_at": t0 + 2.5,
                                                           "imported_at": t0 + 8, "model_request_at": t0 + 9.5,
                                                           "request_at": t0 + 14.2, "trainer_built_at": t0 + 15,
                                                           "loop_began_at": t0 + 15.5}}}
    assert timeline(run) == [("flow run", 2, 60), ("training process: started", 2.5, None),
                             ("stage: preflight", 3, 9), ("training process: imports done", 8, None),
                             ("training process: model stage asked of it", 9.5, None), ("stage: model", 11, 13),
                             ("stage: train", 14, 40), ("training process: train request", 14.2, None),
                             ("training process: Trainer built", 15, None),
                             ("training process: loop began", 15.5, None),
                             ("first training step done", 23, None)]
    assert timeline({"cold": {"launched_at": t0, "timings": {"flow_s": 1}}, "train": {}}) == []  # recorded before


def test_the_time_to_the_training_loop_and_the_first_step_are_measured_apart_on_every_side():
    """Time to first step = time to the training loop + the first step itself; loraflow's first batch holds the
    run's longest example (memory fails at once), so the two are reported apart. A record without the loop's
    start (before 2026-12-04's second run) reports neither."""
    from benchmarks.report import measures

    shape = {"attention_width": 8, "body_linear": 64, "hidden": 8, "layers": 1, "lora_in_out": 16, "qkv_weights": 24,
             "vocab": 32}
    seen = {"positions_seen": 40, "attention_square_sum": 400, "train_examples_per_second": 1.0, "train_loop_s": 4.0}
    script = {**seen, "label_positions_seen": 10, "launched_at": 100.0, "loop_began_at": 113.0,
              "first_step_at": 119.0, "eval_examples_per_second": 1.0, "peak_rss_sum_mb": 1.0,
              "largest_process_rss_mb": 1.0, "rouge": {"rougeL_fmeasure": 0.3}, "stop_rate": 1.0,
              "mean_prediction_words": 10, "wall_s": 50}
    flow = {"cold": {"launched_at": 200.0, "peak_rss_sum_mb": 1.0, "largest_process_rss_mb": 1.0, "wall_s": 60,
                     "timings": {"flow_s": 50, "stages_s": {"train": 30}}},
            "train": {**seen, "label_tokens_seen": 10, "label_only_logits": True, "first_step_at": 221.0,
                      "process": {"loop_began_at": 213.5}},
            "eval": {"generation_examples_per_second": 1.0, "finetuned": {"rougeL_fmeasure": 0.3}},
            "mean_prediction_words": 10, "cached": {"wall_s": 5}}
    base, lf = measures("baseline", script, shape, 1e9), measures("loraflow", flow, shape, 1e9)
    assert (base["time_to_loop_s"], base["first_step_s"], base["time_to_first_step_s"]) == (13.0, 6.0, 19.0)
    assert (lf["time_to_loop_s"], lf["first_step_s"], lf["time_to_first_step_s"]) == (13.5, 7.5, 21.0)
    del flow["train"]["process"]
    assert measures("loraflow", flow, shape, 1e9)["time_to_loop_s"] is None

