"""How much memory training and evaluation will need, from the model's config alone, against what the machine has.

`estimate` counts, for the longest batch (length-grouped batching puts the longest rows together):
- the weights: the linear layers in 4 bits (+ their block constants) or the compute dtype, the rest
  (embeddings, norms, LM head) in the compute dtype or fp32 (`train.upcast_frozen`);
- LoRA: its parameters, gradients and the two AdamW moments, all fp32 (+ autocast's bf16 copy of the weights for
  the step, with `train.bf16`);
- activations kept for the backward pass: per layer and token about 10 x hidden + 4 x intermediate values
  (norm inputs and outputs, q/k/v, attention output, the MLP's gate/up/product), + LoRA dropout's input
  copies when `lora.dropout` > 0, + the attention probabilities (heads x length²) of the math kernel; with
  gradient checkpointing only each layer's input is kept, plus one layer recomputed;
- the logits (fp32), at label positions only with `train.label_only_logits`, with their softmax and gradient;
- the runtime (Python, torch, the libraries; on a GPU the CUDA context).
Evaluation holds the weights (on a CPU dequantized to the compute dtype, `eval.dequantize`), the adapter beside
them (fp32; merged into them only with `eval.merge`) and one generation batch's cache.

It is an estimate. The CPU training runtime constant is calibrated on measured peaks of the training process
(2-core CPU, bf16, SmolLM2-135M; docs/benchmarks.md, "Where the memory goes"): with checkpointing, as `auto` trains
on a CPU since 2026-12-04, and without; with bf16 autocast (on a bf16 CPU since 2026-12-06) and without. The GPU
and evaluation constants are not measured yet. `loraflow validate --probe` measures one real step instead. The model
is built on torch's meta device (shapes, no memory, no weights read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from loraflow.config import PipelineConfig

GIB = 2**30
# A CPU training process beyond the counted parts: imports (~0.9 GiB), the dataset, the Trainer, temporaries and the
# allocator's cache of freed blocks (~1 GB at the peak, with or without checkpointing: benchmarks/memory.py). Under
# bf16 autocast (`train.bf16`) the LoRA path's temporaries are bf16, not fp32 copies of its inputs: the same 24 demo
# steps peaked ~0.5 GB lower (docs/benchmarks.md, 2026-12-06).
RUNTIME_CPU_TRAIN = 2.0 * GIB
RUNTIME_CPU_TRAIN_AUTOCAST = 1.85 * GIB
RUNTIME_CPU = 0.9 * GIB  # a process's RSS after its imports (evaluation, in the flow process)
RUNTIME_GPU = 0.6 * GIB  # CUDA context + kernels (not measured here)


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes
    budget: float  # bytes available
    where: str  # "RAM" or "GPU memory"

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def line(self, what: str) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        return f"{what}: ~{self.total / GIB:.1f} GiB ({parts}) of {self.budget / GIB:.1f} GiB free {self.where}"


def checkpointing(setting: bool | str, cuda: bool, without: Callable[[], Estimate]) -> bool:
    """train.gradient_checkpointing resolved. 'auto' = on on a CPU, where it was measured (benchmarks/memory.py and
    docs/benchmarks.md, 2-core bf16): it halves the training process's peak (~4.9 -> ~2.2 GB on aclsum) for 1.13x
    (AMD EPYC) to 1.34x (Intel Xeon with AMX) the training loop's time. On a GPU (not measured yet), on when the
    estimate for training without it (`without()`, computed only then) exceeds its budget."""
    if setting != "auto":
        return bool(setting)
    if not cuda:
        return True
    need = without()
    return need.total > need.budget


def available(cuda: bool) -> tuple[float, str]:
    """Bytes free now: the GPU's free memory, else RAM available to new allocations (MemAvailable)."""
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return float(free), "GPU memory"
    import psutil

    return float(psutil.virtual_memory().available), "RAM"


_SHAPES: dict[str, dict[str, Any]] = {}  # by the config's JSON: once per process


def shapes(model_config: Any) -> dict[str, Any]:
    """{linear: [(name, in, out)], other_params, lm_head, tied, hidden, intermediate, layers, heads, vocab} from a
    model built on the meta device, once per config and process (the pre-flight's estimate and the train stage's
    checkpointing choice run in the same training process: the second waits for no model build)."""
    from loraflow.store.buildlock import MODEL_BUILD

    key = model_config.to_json_string()
    if key not in _SHAPES:
        with MODEL_BUILD:
            if key not in _SHAPES:
                _SHAPES[key] = _shapes(model_config)
    return _SHAPES[key]


def _shapes(model_config: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # a build sets torch's default dtype process-wide, even on meta (under MODEL_BUILD)
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    linear = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head]
    in_linear = {id(p) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
                 for p in m.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_linear)
    c = model.config
    heads = getattr(c, "num_attention_heads", 1)
    return {"linear": linear, "other_params": other, "vocab": c.vocab_size,
            "hidden": c.hidden_size, "intermediate": getattr(c, "intermediate_size", 4 * c.hidden_size),
            "layers": c.num_hidden_layers, "heads": heads}


def _targets(linear: list[tuple[str, int, int]], target_modules: str | list[str]) -> list[tuple[str, int, int]]:
    if target_modules == "all-linear":
        return linear
    return [t for t in linear if t[0].rsplit(".", 1)[-1] in target_modules]


def _four_bit_bytes(cfg: PipelineConfig) -> float:
    """Bytes per 4-bit weight: half a byte + its block constant (one byte per 64 with double quant, else fp32)."""
    return 0.5 + (1 if cfg.quantization.double_quant else 4) / 64


def _lora_params(cfg: PipelineConfig, s: dict[str, Any]) -> int:
    return sum(cfg.lora.r * (i + o) for _, i, o in _targets(s["linear"], cfg.lora.target_modules))


def training(cfg: PipelineConfig, s: dict[str, Any], batch: int, length: int, label_tokens: int, cuda: bool,
             checkpointing: bool) -> dict[str, float]:
    """Bytes per part for training `batch` rows of `length` tokens, `label_tokens` of them labelled."""
    from loraflow.hardware import resolve_compute_dtype, resolve_mixed_precision
    from loraflow.stages.model import upcasts

    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    autocast = resolve_mixed_precision(cfg.train.bf16, cfg.quantization.compute_dtype)
    width = 4 if dtype == "float32" else 2
    quantized = cfg.quantization.mode != "none"
    linear_params = sum(i * o for _, i, o in s["linear"])
    per_weight = _four_bit_bytes(cfg) if quantized else width
    other_width = 4 if quantized and upcasts(cfg.train.upcast_frozen, cfg.quantization.compute_dtype) else width
    lora = _lora_params(cfg, s)
    if cfg.train.batching != "packed":  # the collator pads the batch to a multiple (`train.pad_to_multiple_of`)
        length = -(-length // cfg.train.pad_to_multiple_of) * cfg.train.pad_to_multiple_of
    h, inter, layers, tokens = s["hidden"], s["intermediate"], s["layers"], batch * length
    act = other_width  # the residual stream is in the dtype of the embeddings and norms
    per_token = (10 * h + 4 * inter) * act
    if cfg.lora.dropout > 0:  # peft drops out a copy of each adapted layer's input
        per_token += sum(i for _, i, _ in _targets(s["linear"], cfg.lora.target_modules)) / layers * act
    attention = batch * s["heads"] * length * length * act * (1 if cuda else 2)  # probabilities (+ their grad on CPU)
    if checkpointing:
        activations = layers * tokens * h * act + tokens * per_token + attention
    else:
        activations = layers * (tokens * per_token + attention)
    logit_rows = label_tokens if cfg.train.label_only_logits else tokens
    return {"weights": linear_params * per_weight + s["other_params"] * other_width, "lora+adam": lora * (18 if autocast else 16),
            "activations": activations, "logits": logit_rows * s["vocab"] * 4 * 3,
            "runtime": RUNTIME_GPU if cuda else RUNTIME_CPU_TRAIN_AUTOCAST if autocast else RUNTIME_CPU_TRAIN}


def evaluation(cfg: PipelineConfig, s: dict[str, Any], length: int, cuda: bool) -> dict[str, float]:
    from loraflow.hardware import resolve_compute_dtype

    width = 4 if resolve_compute_dtype(cfg.quantization.compute_dtype) == "float32" else 2
    linear_params = sum(i * o for _, i, o in s["linear"])
    quantized = cfg.quantization.mode != "none"
    four_bit = quantized and not cfg.eval.dequantizes(quantized, cuda)  # as loraflow.stages.evaluate decides
    weights = linear_params * (_four_bit_bytes(cfg) if four_bit else width) + s["other_params"] * width
    adapter = 0 if cfg.eval.merges(quantized, cuda) else _lora_params(cfg, s) * 4  # fp32, beside the weights
    batch = cfg.eval.batch_size
    kv = 2 * s["layers"] * batch * (length + cfg.eval.max_new_tokens) * s["hidden"] * width
    return {"weights": weights, "adapter": adapter, "kv cache": kv, "logits": batch * s["vocab"] * 4 * 2,
            "runtime": RUNTIME_GPU if cuda else RUNTIME_CPU}


def cuda_visible() -> bool:
    from loraflow.hardware import visible_gpu_count

    return visible_gpu_count() > 0 and os.environ.get("CUDA_VISIBLE_DEVICES") != ""
