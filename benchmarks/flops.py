"""FLOPs of a LoRA training step, counted from the model's config (Llama-style decoders), to read achieved
training FLOP/s against this machine's matmul peak in the compute dtype (`loraflow.hardware.matmul_peaks`).

A frozen-base LoRA step runs the forward pass and the backward pass for the *inputs* of every layer
(the frozen weights need no gradient), so it costs ~2x the forward FLOPs, plus 3x the small LoRA terms:
  forward per position  = 2 * body linear params + 4 * layers * hidden * padded length (QK^T and AV)
  forward per LM-head position = 2 * hidden * vocab
"""

from __future__ import annotations

import json
from pathlib import Path


def model_shape(model_dir: str | Path) -> dict[str, int]:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    d, layers = c["hidden_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v
    inter = c["intermediate_size"]
    mlp = 3 * d * inter  # gate, up, down
    # sum over linear layers of (in + out) features: a rank-r LoRA adds r * (in + out) weights to each
    io = 2 * (d + heads * head_dim) + 2 * (d + kv * head_dim) + 3 * (d + inter)
    return {"hidden": d, "layers": layers, "vocab": c["vocab_size"], "body_linear": layers * (attn + mlp),
            "lora_in_out": layers * io}


def training_flops(shape: dict[str, int], positions: int, head_positions: int, attention_square_sum: int,
                   lora_rank: int = 16) -> float:
    """Executed FLOPs for `positions` body positions (padding included), `head_positions` LM-head positions
    and sum over rows of padded length**2; LoRA on every linear layer adds rank * (in + out) per layer."""
    d, layers = shape["hidden"], shape["layers"]
    frozen = 2 * shape["body_linear"] * positions + 4 * layers * d * attention_square_sum \
        + 2 * d * shape["vocab"] * head_positions
    lora = 2 * lora_rank * shape["lora_in_out"] * positions
    return 2.0 * frozen + 3.0 * lora  # frozen: forward + input gradients; LoRA: also weight gradients
