"""Does an export behave like the model the evaluate stage scored?

The evaluate stage calls `record` on the trained model, its adapter beside the base and never merged (on CPU
the NF4 weights dequantized to the compute dtype; on a GPU the 4-bit model), for the first
`export.parity_samples` validation rows, and keeps the result in its folder (`REFERENCE`). A merged export
is so measured against the model that was trained, its merge's rounding included. For each row:
- teacher-forced on the row's prompt + reference answer: at every answer position, the 16 largest
  next-token logits and their token ids;
- the greedy generation of the prompt (the same `generation.generate`, same batches).

The export stage loads the export the way a user would and calls `compare`: the same forward passes and
generations, scored against the record as top-1 agreement over answer positions (the reference's top token is among the export's
most likely, ties included), max and mean |logit
difference| over the recorded 16 tokens per position, and the greedy exact-match rate. Because the
reference was written when the adapter was scored, an adapter changed afterwards cannot pass by changing
its reference too.
"""

from __future__ import annotations

from typing import Any

from loraflow.config import EvalConfig, ParityThresholds

REFERENCE = "parity_reference.json"
TOP_K = 16


def parity_rows(validation, n: int) -> list[dict[str, Any]]:
    """The first `n` validation rows with what the check reads."""
    rows = validation.select(range(min(n, len(validation))))
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "prompt_ids": r["prompt_ids"],
             "input": r.get("input") or ""} for r in rows]


def _greedy(ev: EvalConfig) -> EvalConfig:
    return ev.model_copy(update={"do_sample": False, "num_beams": 1})


def _answer_logits(model, row: dict[str, Any]):
    """[answer positions, vocab] fp32 logits predicting each label token of `row` (teacher-forced)."""
    import torch

    device = next(model.parameters()).device
    positions = [j - 1 for j, label in enumerate(row["labels"]) if label != -100 and j > 0]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([row["input_ids"]], device=device)).logits[0]
    return logits[positions].float()


def record(model, tokenizer, rows: list[dict[str, Any]], ev: EvalConfig, stops: list[int]) -> dict[str, Any]:
    """The reference: per row, the top-16 logits at each answer position and the greedy generation."""
    from loraflow.stages.generation import generate

    greedy = generate(model, tokenizer, [r["prompt_ids"] for r in rows], _greedy(ev), "parity reference", stops)
    out = []
    for row, text in zip(rows, greedy):
        values, ids = _answer_logits(model, row).topk(TOP_K, dim=-1)
        out.append({"top_ids": ids.tolist(), "top_logits": values.tolist(), "greedy": text})
    return {"n": len(rows), "top_k": TOP_K, "rows": out}


def compare(model, tokenizer, rows: list[dict[str, Any]], reference: dict[str, Any], ev: EvalConfig,
            stops: list[int]) -> dict[str, Any]:
    """The export's numbers against `reference` (see the module docstring), with the worst row."""
    import torch

    from loraflow.stages.generation import generate

    ref_rows = reference["rows"][: len(rows)]
    greedy = generate(model, tokenizer, [r["prompt_ids"] for r in rows], _greedy(ev), "parity", stops)
    per_row, agree, positions, diffs_sum, diffs_n, max_diff = [], 0, 0, 0.0, 0, 0.0
    for i, (row, ref, text) in enumerate(zip(rows, ref_rows, greedy)):
        logits = _answer_logits(model, row)
        ids, ref_logits = torch.tensor(ref["top_ids"]), torch.tensor(ref["top_logits"])
        # the reference's top token is the export's top token (bf16 logits tie often: any of a tied maximum counts)
        logits = logits.cpu()
        hits = int((logits.gather(1, ids[:, :1]).squeeze(1) >= logits.max(-1).values).sum())
        diff = (logits.gather(1, ids) - ref_logits).abs()
        agree, positions = agree + hits, positions + len(ids)
        diffs_sum, diffs_n = diffs_sum + float(diff.sum()), diffs_n + diff.numel()
        row_max = float(diff.max()) if diff.numel() else 0.0
        max_diff = max(max_diff, row_max)
        per_row.append({"row": i, "input": row["input"][:80], "top1_agreement": hits / max(len(ids), 1),
                        "max_abs_logit_diff": row_max, "greedy_match": text == ref["greedy"],
                        "greedy": text, "reference_greedy": ref["greedy"]})
    worst = min(per_row, key=lambda r: (r["top1_agreement"], r["greedy_match"], -r["max_abs_logit_diff"]))
    return {
        "n": len(rows),
        "answer_positions": positions,
        "top1_agreement": round(agree / max(positions, 1), 4),
        "max_abs_logit_diff": round(max_diff, 4),
        "mean_abs_logit_diff": round(diffs_sum / max(diffs_n, 1), 5),
        "greedy_exact_match": round(sum(r["greedy_match"] for r in per_row) / len(per_row), 4),
        "worst": worst,
    }


def failures(result: dict[str, Any], thresholds: ParityThresholds) -> list[str]:
    """What `result` misses of `thresholds` (empty: it passes)."""
    out = []
    if result["top1_agreement"] < thresholds.min_top1_agreement:
        out.append(f"top-1 agreement {result['top1_agreement']:.3f} < {thresholds.min_top1_agreement}")
    if result["greedy_exact_match"] < thresholds.min_greedy_exact_match:
        out.append(f"greedy exact match {result['greedy_exact_match']:.3f} < {thresholds.min_greedy_exact_match}")
    limit = thresholds.max_mean_abs_logit_diff
    if limit is not None and result["mean_abs_logit_diff"] > limit:
        out.append(f"mean |logit diff| {result['mean_abs_logit_diff']:.4f} > {limit}")
    if result.get("tokenizer_match", 1.0) < 1.0:
        out.append(f"the export's tokenizer re-encodes only {result['tokenizer_match']:.0%} of the prompts to the same ids")
    return out


def worst_line(result: dict[str, Any]) -> str:
    w = result["worst"]
    return (f"worst prompt: validation row {w['row']} ({w['input'][:50]!r}): top-1 {w['top1_agreement']:.2f}, "
            f"max |logit diff| {w['max_abs_logit_diff']:.3f}, greedy {'matches' if w['greedy_match'] else 'differs'}")
