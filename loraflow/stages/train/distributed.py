"""Several training processes on one machine: PyTorch DDP launched by torchrun.

`train.num_processes` > 1 starts the train worker as `torchrun --standalone --nproc-per-node N -m
loraflow.stages.worker`; every rank runs the same `train_adapter` code as a single process would, Trainer
(through accelerate) joins the process group from torchrun's environment (RANK, WORLD_SIZE, ...),
and rank 0 alone writes checkpoints, the adapter and the stage's artifacts. Nothing here imports
torch at module level. `train.num_processes: auto` is resolved by `loraflow.hardware.resolve_processes`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ERROR_MARK = "loraflow-error "  # a rank's failure, one line: the launcher reports the first one


def worker_command(num_processes: int, request: str) -> list[str]:
    """The train worker's command line: plain Python for one process, torchrun for several."""
    if num_processes == 1:
        return [sys.executable, "-m", "loraflow.stages.worker", request]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
            "-m", "loraflow.stages.worker", request]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def ddp_backend(choice: str, cuda: bool) -> str | None:
    """The process-group backend for TrainingArguments (None when running one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return ("nccl" if cuda else "gloo") if choice == "auto" else choice


def sum_over_ranks(counts: dict[str, int], device: Any) -> dict[str, int]:
    """Element-wise sum of per-rank counters (identity in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return counts
    values = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {k: int(v) for k, v in zip(counts, values.tolist())}


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order ([value] in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
