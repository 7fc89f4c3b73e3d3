"""Prefect's cache key for a stage task: the address of the folder the stage writes (`loraflow.store`).

A stage task receives its key as an argument (`key`, a `store.StageKey`): the run computes every stage's
key once (`flows.pipeline.run_stages`), so Prefect's cache key, the log line that explains a miss and the
folder the stage writes are one value, never three computations that could disagree.
"""

from __future__ import annotations

from typing import Any, Callable

from loraflow import store


def run_of(parameters: dict[str, Any]) -> Any:
    return parameters.get("run") or parameters["cfg"].run


def cache_key_fn(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    def key(_ctx: Any, parameters: dict[str, Any]) -> str:
        return store.prefect_key(stage, parameters["key"].key, run_of(parameters).output_dir)

    key.__name__ = f"{stage}_cache_key"
    return key


def explain_miss(stage: str, parameters: dict[str, Any], output_dir: str) -> str:
    """Why the stage runs: a refresh, or what differs from the nearest earlier key in `output_dir`."""
    sk = parameters["key"]
    if run_of(parameters).refreshes(stage):
        return f"key {sk.key}: refresh requested (run.refresh): recomputing"
    return f"key {sk.key}: {store.explain(output_dir, sk)}"
