"""The **evaluate** stage: generate and score ROUGE with intervals, fine-tuned vs base.

Two splits, two purposes. *Validation* (the first `eval.max_validation_samples` rows, fine-tuned
model only): the score that ranks sweeps and decides promotions. *Test*: the final report, fine-tuned
and base, each with a 95% cluster-bootstrap interval and a paired interval for the difference
(`loraflow.metrics.scoring`). Nothing but this stage reads the test split, and nothing chooses on it.
Generation stops on every end-of-turn id (`prompts.stop_token_ids`), not a single eos id.

Generation (`loraflow.stages.generation`) is batched with left padding (so every prompt ends where generation
starts), prompts sorted by length (less padding per batch), the KV cache on and `torch.inference_mode`.

The scored model is the trained one: the base it was trained against with the adapter *beside* it, as
in training (`scored_model`). On CPU (`eval.dequantize: auto`) the NF4 weights are expanded once to the
compute dtype, the values the 4-bit layers dequantize to on every call, which saves a dequantization per
matmul per token; the adapter is not merged into them (`eval.merge: false`), because in bf16 an update
smaller than half a step of its weight would be rounded away (tests/test_evaluation.py). The base is the
same model with its adapter disabled, so both are scored on the same examples with the same weights.
The export's parity reference is recorded on this unmerged model, before any merge.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from loraflow.store.artifacts import Handle, write_json
from loraflow.config import EvalConfig, PipelineConfig
from loraflow.stages.generation import generate

log = logging.getLogger("loraflow")
INFO = "metrics.json"  # the stage's summary, the Handle's info (`store.build` writes what `run` returns)


def use_dequantized(ev: EvalConfig, quantized: bool) -> bool:
    """'auto' = on CPU, where 4-bit matmuls dequantize on every call (`EvalConfig.dequantizes`)."""
    import torch

    return ev.dequantizes(quantized, torch.cuda.is_available())


def scored_model(cfg: PipelineConfig, base_dir: str | Path, adapter_dir: str | Path):
    """(the model the evaluate stage scores, whether its base is dequantized): the base the adapter was trained
    against (on CPU with `eval.dequantize`, its 4-bit weights expanded once to the compute dtype) with the adapter
    loaded beside it, unmerged, in eval mode (dropout off) with the KV cache on. `cfg.quantization` resolved."""
    from peft import PeftModel

    from loraflow.store.buildlock import MODEL_BUILD
    from loraflow.stages.model import load_base

    base = load_base(base_dir, cfg.model, cfg.quantization, cache_dir=cfg.run.cache_dir)
    dequantized = use_dequantized(cfg.eval, cfg.quantization.mode != "none")
    with MODEL_BUILD:
        if dequantized:
            base = base.dequantize()  # bitsandbytes Linear4bit -> nn.Linear holding the dequantized weights
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    model.config.use_cache = True
    return model, dequantized


def run(cfg: PipelineConfig, tokenized: Handle, model_handle: Handle, trained: Handle, out: Path) -> dict[str, Any]:
    """Score the fine-tuned adapter (and the base model) with ROUGE into `out`: predictions.jsonl,
    validation_predictions.jsonl, the parity reference; returns the scores (`metrics.json`, the Handle's info).
    `cfg` is resolved (`hardware.resolve`): its compute dtype is the one the adapter was trained in."""
    import datasets
    import torch

    from loraflow.stages import parity
    from loraflow.store.buildlock import MODEL_BUILD
    from loraflow.stages.prompts import stop_token_ids
    from loraflow.metrics.scoring import score_split

    splits = datasets.load_from_disk(str(Path(tokenized.path) / "dataset"))
    test, validation = splits["test"], splits["validation"]
    if cfg.eval.max_validation_samples is not None:
        validation = validation.select(range(min(cfg.eval.max_validation_samples, len(validation))))
    prompts = test["prompt_ids"]
    from loraflow.stages.tokenize import load_tokenizer

    tokenizer = load_tokenizer(Path(trained.path) / "adapter")
    model, dequantized = scored_model(cfg, model_handle.info["base_dir"], Path(trained.path) / "adapter")
    stops = stop_token_ids(tokenizer, cfg.prompt, model.generation_config)
    # what an export must reproduce (`loraflow.stages.parity`): the trained model, recorded before any merge
    reference = parity.record(model, tokenizer, parity.parity_rows(splits["validation"], cfg.export.parity_samples),
                              cfg.eval, stops)
    base_preds: list[str] | None = None
    if cfg.eval.compare_base:
        with model.disable_adapter():
            base_preds = generate(model, tokenizer, prompts, cfg.eval, "generate (base)", stops)
    merged = cfg.eval.merges(cfg.quantization.mode != "none", torch.cuda.is_available())  # never into 4-bit weights
    if merged:
        with MODEL_BUILD:
            model = model.merge_and_unload()

    t0 = time.perf_counter()
    tuned = generate(model, tokenizer, prompts, cfg.eval, "generate (fine-tuned)", stops)
    seconds = time.perf_counter() - t0
    val_preds = generate(model, tokenizer, validation["prompt_ids"], cfg.eval, "generate (validation)", stops)
    systems = {"finetuned": tuned, **({"base": base_preds} if base_preds is not None else {})}
    summary, per = score_split(systems, test["references"], test["cluster"], cfg.eval)
    val_summary, val_per = score_split({"finetuned": val_preds}, validation["references"], validation["cluster"], cfg.eval)
    metrics: dict[str, Any] = {
        **summary,  # the test report: n_examples, finetuned, base, intervals, vs_base
        "validation": val_summary,  # what sweeps and promotion choose by
        "generation_examples_per_second": round(len(prompts) / seconds, 3),
        "generation_s": round(seconds, 3),
        "dequantized": dequantized,
        "merged": merged,  # false: the adapter beside the base weights, as trained (eval.merge)
        "compute_dtype": cfg.quantization.compute_dtype,  # resolved (hardware.resolve)
        "stop_token_ids": stops,
    }
    write_predictions(out / "predictions.jsonl", test, systems, per)
    write_predictions(out / "validation_predictions.jsonl", validation, {"finetuned": val_preds}, val_per)
    write_json(out / parity.REFERENCE, reference)
    return metrics


def write_predictions(path: Path, rows, systems: dict[str, list[str]], per: dict[str, dict[str, list[float]]]) -> None:
    """One JSON line per row: input, references, cluster, each system's prediction and its ROUGE F1 scores."""
    from loraflow.metrics.scoring import row_scores

    names = {"finetuned": "prediction", "base": "base_prediction"}
    with open(path, "w") as fh:
        for i in range(len(rows)):
            row = {"input": rows[i].get("input"), "references": rows[i]["references"], "cluster": rows[i]["cluster"]}
            for name, preds in systems.items():
                row[names[name]] = preds[i]
                row[f"{names[name]}_scores"] = row_scores(per, name, i)
            fh.write(json.dumps(row) + "\n")
