"""Run with the packages the GPU machine lacks (`benchmarks.gpu_env.BLOCKED`) made absent.

    python -m benchmarks.absent benchmarks.gpu --dry-run ...   # a module run as __main__
    python -m pytest -p benchmarks.absent ...                  # as a pytest plugin: blocked on import
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.gpu_env import block_imports

block_imports()

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
