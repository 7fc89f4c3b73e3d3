"""tests/gpu: the CUDA path, skipped without a CUDA device (scripts/gpu-check runs them on one).

LORAFLOW_GPU_TESTS_ON_CPU=1 runs them anyway, to work on a test's code on a CPU (the CUDA facts then fail).
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() or os.environ.get("LORAFLOW_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: scripts/gpu-check runs these on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
