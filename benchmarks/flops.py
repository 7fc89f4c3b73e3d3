"""FLOPs of a LoRA training step, counted from the model's config (Llama-style decoders), to read achieved
training FLOP/s against this machine's matmul peak in the compute dtype (`loraflow.hardware.matmul_peaks`).

Forward, per position: 2 x every linear weight of the body, plus per row 4 x layers x heads x head_dim x
padded length**2 for QK^T and PV, plus 2 x hidden x vocab per LM-head position. The backward pass of a
frozen-base LoRA step:
  - frozen linear weights: only the gradient of their *input*, 1 x forward (none for layer 0's q, k, v,
    whose input, the embeddings, needs no gradient unless `inputs_require_grad`);
  - attention's QK^T and PV have no weights: dQ, dK, dV and dP are all needed, 2 x forward (3 x in all);
  - LoRA A and B: weight and input gradients, 2 x forward (3 x in all; again no input gradient for
    layer 0's q, k, v);
  - the LM head (frozen): its input gradient, 1 x forward.
These are model FLOPs (a fused SDPA backward also recomputes QK^T, which `torch.utils.flop_counter` counts
and utilization figures conventionally leave out). `tests/test_benchmarks.py` checks forward and forward +
backward against `torch.utils.flop_counter`.
"""

from __future__ import annotations

import json
from pathlib import Path


def model_shape(model_dir: str | Path) -> dict[str, int]:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    d, layers = c["hidden_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or d // heads
    qkv = d * (heads + 2 * kv) * head_dim  # q, k, v weights
    attn = qkv + heads * head_dim * d  # and o
    inter = c["intermediate_size"]
    mlp = 3 * d * inter  # gate, up, down
    # sum over linear layers of (in + out) features: a rank-r LoRA adds r * (in + out) weights to each
    io = 2 * (d + heads * head_dim) + 2 * (d + kv * head_dim) + 3 * (d + inter)
    return {"hidden": d, "layers": layers, "vocab": c["vocab_size"], "body_linear": layers * (attn + mlp),
            "lora_in_out": layers * io, "attention_width": heads * head_dim, "qkv_weights": qkv}


def forward_flops(shape: dict[str, int], positions: int, head_positions: int, attention_square_sum: int,
                  lora_rank: int = 16) -> dict[str, float]:
    """Forward FLOPs by part, for `positions` body positions (padding included), `head_positions` LM-head
    positions and the sum over rows of padded length**2."""
    return {
        "linear": 2.0 * shape["body_linear"] * positions,
        "attention": 4.0 * shape["layers"] * shape["attention_width"] * attention_square_sum,
        "head": 2.0 * shape["hidden"] * shape["vocab"] * head_positions,
        "lora": 2.0 * lora_rank * shape["lora_in_out"] * positions,
    }


def training_flops(shape: dict[str, int], positions: int, head_positions: int, attention_square_sum: int,
                   lora_rank: int = 16, inputs_require_grad: bool = False) -> float:
    """Executed FLOPs of forward + backward (see the module docstring)."""
    f = forward_flops(shape, positions, head_positions, attention_square_sum, lora_rank)
    backward = f["linear"] + 2 * f["attention"] + f["head"] + 2 * f["lora"]
    if not inputs_require_grad:  # layer 0's q, k, v: no gradient for the embeddings
        backward -= 2.0 * shape["qkv_weights"] * positions + 2.0 * lora_rank * 3 * shape["hidden"] * positions
    return sum(f.values()) + backward
