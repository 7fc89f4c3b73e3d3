"""One model build at a time in a process.

While transformers builds a model it swaps process-wide functions for no-ops (`torch.nn.init.*`,
`PreTrainedModel.init_weights` and `tie_weights`; accelerate's `init_empty_weights` patches
`nn.Module.register_parameter`) and puts the originals back afterwards. Two threads doing that at
once (a sweep's children, or two runs of one flow process) can restore each other's no-ops: every
later model then comes out untied and uninitialised (found in CI: a zero LM head, a NaN loss).
Every model load, adapter attach, merge and conversion in loraflow holds this lock.

`making(folder)`: one lock per machine-cache folder (a GGUF conversion, a base's 4-bit copy), so a second thread
of the process waits for the first's folder instead of making it again (and replacing the one the first may
already be reading).
"""

from __future__ import annotations

import threading
from pathlib import Path

MODEL_BUILD = threading.RLock()

_MAKING: dict[Path, threading.Lock] = {}
_MAKING_LOCK = threading.Lock()


def making(folder: Path) -> threading.Lock:
    """The lock of the cache folder `folder` in this process (see the module)."""
    with _MAKING_LOCK:
        return _MAKING.setdefault(folder, threading.Lock())
