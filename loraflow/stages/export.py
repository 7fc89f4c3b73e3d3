"""The **export** stage: the trained adapter merged into its base, as a transformers folder and/or a GGUF
file, published only if it behaves like the model the evaluate stage scored.

    <output_dir>/export/<key>/
      merged/          safetensors in export.dtype + tokenizer + chat template + generation config (no peft needed)
      gguf/            <run.name>-<gguf_type>.gguf (tokenizer and chat template in its metadata) + an Ollama Modelfile
      parity.json      {"passed", "format", "top1_agreement", "max_abs_logit_diff", "greedy_exact_match", "n", "checks"}
      export.json      what was written, sizes, parity, seconds (the stage's handle info)

`export.base: dequantized` (default) merges into the 4-bit base expanded to the compute dtype, the
weights the adapter was trained against, in `export.dtype` (in fp32 the adapter's update survives whole; a
16-bit merge rounds away updates below half a step of their weight, which the parity check, against the
unmerged model the evaluate stage scored, then shows);
`original` merges into the full-precision weights, which the adapter never saw: its parity is reported,
not gated. Each export is loaded back from its files (the GGUF through transformers' `gguf_file=`) and
compared with the evaluate stage's record (`loraflow.stages.parity`); a gated check that fails raises
`ExportParityError` naming the worst prompt, and nothing is published (the report is kept beside the
folder as `<key>.rejected.json`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from loraflow.store.artifacts import Handle, Rejected, write_json
from loraflow.config import ExportConfig, ParityThresholds, PipelineConfig

log = logging.getLogger("loraflow")
INFO = "export.json"  # the stage's summary, the Handle's info (`store.build` writes what `run` returns)


class ExportParityError(Rejected):
    """An export does not reproduce the evaluated model; nothing was published. The message names the worst prompt."""


def wanted(export: ExportConfig, flow: str, promoted: bool = False) -> bool:
    """Whether a flow runs the export stage (`export.enabled`; 'auto' = retraining, after a promotion)."""
    if export.enabled == "auto":
        return flow == "retrain" and promoted
    return bool(export.enabled) and (flow != "retrain" or promoted)


def formats(export: ExportConfig) -> list[str]:
    return ["merged", "gguf"] if export.format == "both" else [export.format]


def thresholds(export: ExportConfig, fmt: str) -> ParityThresholds | None:
    """The gate of one export (None: reported only, for export.base=original)."""
    if export.base == "original":
        return None
    return export.parity_q8_0 if fmt == "gguf" and export.gguf_type == "q8_0" else export.parity_merged


def merged_model(cfg: PipelineConfig, model_handle: Handle, adapter: Path):
    """The adapter merged into its base (export.base), in the export dtype, on this process's device."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.store.buildlock import MODEL_BUILD
    from loraflow.stages.model import load_base

    dtype = getattr(torch, cfg.export.dtype)
    with MODEL_BUILD:
        if cfg.export.base == "original" or cfg.quantization.mode == "none":
            base = AutoModelForCausalLM.from_pretrained(model_handle.info["base_dir"], dtype=dtype,
                                                        trust_remote_code=cfg.model.trust_remote_code)
            if torch.cuda.is_available():
                base = base.to("cuda")
        else:  # NF4 -> the compute dtype: what the adapter was trained against (exact in a wider dtype too)
            base = load_base(model_handle.info["base_dir"], cfg.model, cfg.quantization,
                             cache_dir=cfg.run.cache_dir).dequantize()
        # merged in the export's dtype: in fp32 the adapter's update survives whole; in bf16 an update below half a
        # step of its weight rounds away, and the parity check against the unmerged scored model shows it
        merged = PeftModel.from_pretrained(base.to(dtype), adapter).merge_and_unload()
    return merged.eval()


def run(cfg: PipelineConfig, tokenized: Handle, model_handle: Handle, trained: Handle, scores: Handle,
        out: Path) -> dict[str, Any]:
    """Merge, write, check parity and publish the export of `trained` into `out` (see the module docstring);
    returns what was written and the parity checks (`export.json`, the Handle's info). `cfg` is resolved
    (`hardware.resolve`)."""
    import datasets

    from loraflow.stages.parity import REFERENCE, parity_rows
    from loraflow.stages.tokenize import load_tokenizer

    t0 = time.perf_counter()
    ref_path = Path(scores.path) / REFERENCE
    if not ref_path.is_file():
        raise ValueError(f"export: the evaluate stage {scores.fingerprint} has no parity reference ({REFERENCE}); it "
                         "was scored by an older loraflow: rerun with --set run.refresh=[evaluate]")
    reference = json.loads(ref_path.read_text())
    validation = datasets.load_from_disk(str(Path(tokenized.path) / "dataset"))["validation"]
    rows = parity_rows(validation, reference["n"])
    adapter = Path(trained.path) / "adapter"
    tokenizer = load_tokenizer(adapter)
    stops = list(scores.info["stop_token_ids"])
    fmts = formats(cfg.export)
    if "gguf" in fmts:  # refuse before merging anything
        from transformers import AutoConfig

        from loraflow.stages.gguf import check_supported

        check_supported(AutoConfig.from_pretrained(model_handle.info["base_dir"]), adapter)
    merged = merged_model(cfg, model_handle, adapter)
    info: dict[str, Any] = {"format": cfg.export.format, "base": cfg.export.base, "dtype": cfg.export.dtype,
                            "gguf_type": cfg.export.gguf_type if "gguf" in fmts else None, "files": {}, "size_mb": {}}
    checks = []
    with tempfile.TemporaryDirectory() as scratch:
        tok_dir = out / "merged" if "merged" in fmts else Path(scratch)
        _save_tokenizer(tokenizer, tok_dir)
        if "merged" in fmts:
            _save_merged(merged, stops, tokenizer, out / "merged")
            info["files"]["merged"] = "merged"
            info["size_mb"]["merged"] = _size_mb(out / "merged", "*.safetensors")
        if "gguf" in fmts:
            from loraflow.stages.gguf import write_gguf

            name = f"{cfg.run.name}-{cfg.export.gguf_type}.gguf"
            (out / "gguf").mkdir()
            write_gguf(merged, tokenizer, tok_dir, out / "gguf" / name, cfg.export.gguf_type, cfg.run.name)
            (out / "gguf" / "Modelfile").write_text(modelfile(name, tokenizer, stops))
            info["files"]["gguf"] = f"gguf/{name}"
            info["size_mb"]["gguf"] = _size_mb(out / "gguf", "*.gguf")
        del merged
        for fmt in fmts:
            checks.append(_check(cfg, fmt, out, info["files"][fmt], tokenizer, rows, reference, stops))
    parity = parity_summary(cfg.export.format, checks)
    if not parity["passed"]:
        bad = next(c for c in checks if not c["passed"])
        raise ExportParityError(
            f"export parity failed for {bad['label']} vs the evaluated model on {bad['n']} validation rows: "
            f"{'; '.join(bad['failures'])}; {bad['worst_line']}: nothing published{rounding_fix(cfg, bad, adapter)}",
            parity)
    info["parity"] = parity
    info["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "parity.json", parity)
    log.info("export: %s", ", ".join(f"{c['label']} top-1 {c['top1_agreement']:.3f} greedy {c['greedy_exact_match']:.2f}"
                                     for c in checks))
    return info


def rounding_fix(cfg: PipelineConfig, check: dict[str, Any], adapter: Path | str) -> str:
    """What to do when a merged export (or a 16-bit GGUF) misses the gate: the scored model keeps the adapter beside
    its weights, and no merge reproduces it exactly (a 16-bit merge rounds the smallest updates away; an fp32 export
    computes in fp32 where the scored model computed in the compute dtype)."""
    if check["format"] == "gguf" and cfg.export.gguf_type == "q8_0":
        return ""  # 8-bit blocks: their own, looser gate
    gate = "export.parity_merged"
    return (f"; a merge does not reproduce the scored model (the adapter beside its weights) exactly: publish the "
            f"adapter with its base ({adapter}, loaded with peft: the scored model), or, if this difference is "
            f"acceptable, loosen {gate} (e.g. --set {gate}.min_top1_agreement=0.9)")


def _save_tokenizer(tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)


def _save_merged(merged, stops: list[int], tokenizer, folder: Path) -> None:
    """safetensors + a generation config that stops on every end-of-turn id the evaluate stage stopped on."""
    gen = merged.generation_config
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(folder)


def _size_mb(folder: Path, pattern: str) -> float:
    return round(sum(p.stat().st_size for p in folder.glob(pattern)) / 2**20, 1)


def load_export(folder: Path, file: str, dtype_name: str):
    """An export loaded as a user would: `from_pretrained` on the merged folder, or on the GGUF (`gguf_file=`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / file
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype_name)}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _check(cfg: PipelineConfig, fmt: str, tmp: Path, file: str, tokenizer, rows, reference, stops) -> dict[str, Any]:
    from loraflow.stages.parity import compare, failures, worst_line

    label = "merged" if fmt == "merged" else f"gguf {cfg.export.gguf_type}"
    # compared in the dtype the reference was computed in (a GGUF loads as fp32 otherwise)
    model, loaded_tok = load_export(tmp, file, cfg.export.dtype if fmt == "merged" else
                                    cfg.quantization.compute_dtype)
    result = compare(model, tokenizer, rows, reference, cfg.eval, stops)
    result.update(tokenizer_agreement(tokenizer, loaded_tok, rows))
    gate = thresholds(cfg.export, fmt)
    missed = failures(result, gate) if gate is not None else []
    del model
    return {"label": label, "format": fmt, "base": cfg.export.base, "gated": gate is not None,
            "passed": not missed, "failures": missed, "worst_line": worst_line(result), **result}


def tokenizer_agreement(original, loaded, rows) -> dict[str, Any]:
    """Whether the export's own tokenizer gives the ids the model was trained and scored on: each prompt
    decoded and re-encoded, and a two-turn chat rendered by the exported chat template."""
    same = sum(loaded(original.decode(r["prompt_ids"]), add_special_tokens=False)["input_ids"] == r["prompt_ids"]
               for r in rows)
    chat = [{"role": "user", "content": "Summarise: the cat sat on the mat."}, {"role": "assistant", "content": "A cat sat."},
            {"role": "user", "content": "Shorter, 12 words at most?"}]
    template_same = None
    if original.chat_template:
        template_same = (loaded.chat_template is not None and loaded.apply_chat_template(chat, add_generation_prompt=True)
                         == original.apply_chat_template(chat, add_generation_prompt=True))
    return {"tokenizer_match": round(same / max(len(rows), 1), 4), "chat_template_match": template_same}


def parity_summary(fmt: str, checks: list[dict[str, Any]]) -> dict[str, Any]:
    """parity.json: the weakest numbers over the checks at the top, each check in `checks`."""
    keep = ("label", "format", "base", "gated", "passed", "failures", "n", "answer_positions", "top1_agreement",
            "max_abs_logit_diff", "mean_abs_logit_diff", "greedy_exact_match", "tokenizer_match",
            "chat_template_match", "worst")
    return {
        "passed": all(c["passed"] for c in checks),
        "format": fmt,
        "top1_agreement": min(c["top1_agreement"] for c in checks),
        "max_abs_logit_diff": max(c["max_abs_logit_diff"] for c in checks),
        "greedy_exact_match": min(c["greedy_exact_match"] for c in checks),
        "n": min(c["n"] for c in checks),
        "checks": [{k: c.get(k) for k in keep} for c in checks],
    }


def modelfile(gguf_name: str, tokenizer, stops: list[int]) -> str:
    """An Ollama Modelfile for the GGUF: the stop tokens, and for ChatML templates the same turns as a Go
    template with the system prompt the chat template adds by default (Ollama cannot run Jinja)."""
    lines = [f"FROM ./{gguf_name}", ""]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                              add_generation_prompt=True)
        head = probe.split("<|im_start|>user")[0]
        if head.startswith("<|im_start|>system\n"):
            system = head[len("<|im_start|>system\n"):].split("<|im_end|>")[0]
            lines += [f'SYSTEM """{system}"""', ""]
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system', "{{ .System }}<|im_end|>", "{{ end }}",
                  "{{- range .Messages }}<|im_start|>{{ .Role }}", "{{ .Content }}<|im_end|>", "{{ end }}"
                  "<|im_start|>assistant", '"""', ""]
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stops)):
        lines.append(f'PARAMETER stop "{token}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
