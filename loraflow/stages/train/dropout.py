"""The LoRA dropout on a CPU, at the price of its random numbers.

peft puts an `nn.Dropout` before each LoRA A matrix. On a CPU, `torch.nn.functional.dropout` draws one
32-bit random number per element (torch's CPU generator), and on a 2-core machine those draws were about a
third of a training step of SmolLM2-135M (7 LoRA modules a layer, each input dropped apart; with activation
checkpointing, drawn twice). `CpuDropout` drops each element with the same probability (p rounded to a
multiple of 1/65536) from 16-bit lanes of 64-bit draws: one draw for four elements. The draws come from
NumPy's SFC64, a generator several times faster than torch's CPU one, seeded by one draw of torch's generator
per call: a run is as reproducible under `torch.manual_seed` as before, and a checkpointed layer's
recomputation (which restores torch's generator state) draws the same seed, so the same mask. On a GPU,
torch's dropout is one fused kernel and stays.

    uv run python -m benchmarks.levers --parts train   # each lever alone: seconds per step
"""

from __future__ import annotations

from functools import lru_cache

LANES = 65536  # each element's draw: one 16-bit lane


def lane_probability(p: float) -> float:
    """The dropout probability the lanes give for `p`: p rounded to a multiple of 1/65536."""
    return round(p * LANES) / LANES


def keep_threshold(p: float) -> int:
    """The signed 16-bit lane value at and above which an element is kept: a lane is below it with probability
    `lane_probability(p)`."""
    return -LANES // 2 + round(p * LANES)


def use_cpu_dropout(model, source: str = "sfc64") -> int:
    """Replace every LoRA dropout (`nn.Dropout` in peft's `lora_dropout`) of `model` with `CpuDropout` of the
    same p; returns how many. For a model that trains on the CPU. A p the lanes cannot give (rounding to 0 or
    1: under 1/131072 of either end) keeps torch's dropout."""
    import torch

    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout and 0.0 < lane_probability(layer.p) < 1.0:
                dropouts[name] = cpu_dropout(layer.p, source)
                count += 1
    return count


SOURCES = ("sfc64", "torch")  # where the 64-bit draws come from; "torch" (its generator alone) for benchmarks.levers


def cpu_dropout(p: float, source: str = "sfc64"):
    """An `nn.Module` like `nn.Dropout(p)` (identity in eval mode, inputs scaled by 1/(1-p) in training)."""
    return _module_class()(p, source)


@lru_cache(maxsize=1)
def _module_class():
    import numpy as np
    import torch

    def draws(n: int, source: str):
        """n 64-bit draws as int64, from torch's generator or from SFC64 seeded by one draw of it."""
        if source == "torch":
            return torch.empty(n, dtype=torch.int64).random_(-2**63, 2**63 - 1)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))

    class _Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, keep, scale):
            ctx.save_for_backward(keep)  # one byte an element (torch's CPU dropout keeps one in x's dtype)
            ctx.scale = scale
            return x.mul(as_factor(keep, x.dtype)).mul_(scale)

        @staticmethod
        def backward(ctx, grad):
            (keep,) = ctx.saved_tensors
            return grad.mul(as_factor(keep, grad.dtype)).mul_(ctx.scale), None, None

    def as_factor(keep, dtype):
        """The mask as 0/1 in `dtype`, so that each product has one dtype. A bool mask times a bf16 tensor (and
        `aten.native_dropout_backward`, and bool -> bf16) runs torch's per-element casting loop on a CPU: 3-10x
        slower than converting through uint8 and multiplying alike, with the same bits (`tests/test_dropout.py`;
        under bf16 autocast the LoRA input is bf16)."""
        return keep.view(torch.uint8).to(dtype)

    class CpuDropout(torch.nn.Module):
        def __init__(self, p: float, source: str = "sfc64") -> None:
            super().__init__()
            if source not in SOURCES:
                raise ValueError(f"unknown source of draws {source!r}: one of {', '.join(SOURCES)}")
            if not 0.0 <= lane_probability(p) < 1.0:
                raise ValueError(f"dropout probability {p} is not in [0, 1 - 1/131072): use torch.nn.Dropout")
            self.p, self.threshold, self.source = p, keep_threshold(p), source
            self.scale = 1.0 / (1.0 - lane_probability(p))  # the kept elements' scale, for the p the lanes give

        def forward(self, x):
            if not self.training or self.threshold == -LANES // 2:  # in eval, or p rounds to 0: nothing dropped
                return x
            n = x.numel()
            keep = draws((n + 3) // 4, self.source).view(torch.int16)[:n].view(x.shape) >= self.threshold
            return _Masked.apply(x, keep, self.scale)

        def extra_repr(self) -> str:
            return f"p={self.p}, source={self.source}"

    return CpuDropout
