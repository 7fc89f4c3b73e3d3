"""Known, harmless library messages a user cannot act on, silenced once (imported by `loraflow/__init__`).

Each filter matches one message exactly; every other warning still shows.
"""

from __future__ import annotations

import logging
import warnings


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    # bitsandbytes (>= 0.49) on an AVX512-BF16 CPU tries to fetch an inference-only 4-bit kernel from the Hugging
    # Face hub ("kernels" package) at import and warns when it cannot. loraflow never uses that kernel: training
    # forbids it (loraflow.stages.model.set_cpu_4bit_kernel) and CPU evaluation dequantizes the weights once instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropPrefix("Failed to load CPU gemm_4bit_forward"))
    # peft reads the deprecated `model.is_gradient_checkpointing` (transformers 5 renamed it); the warning is
    # about peft's code, not ours or the user's.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
