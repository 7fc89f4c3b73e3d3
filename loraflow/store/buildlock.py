"""One model build at a time in a process.

While transformers builds a model it swaps process-wide functions for no-ops (`torch.nn.init.*`,
`PreTrainedModel.init_weights` and `tie_weights`; accelerate's `init_empty_weights` patches
`nn.Module.register_parameter`) and puts the originals back afterwards. Two threads doing that at
once (a sweep's children, or two runs of one flow process) can restore each other's no-ops: every
later model then comes out untied and uninitialised (found in CI: a zero LM head, a NaN loss).
Every model load, adapter attach, merge and conversion in loraflow holds this lock.
"""

from __future__ import annotations

import threading

MODEL_BUILD = threading.RLock()
