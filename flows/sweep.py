"""The sweep flow: one base config and a grid (or list) of overrides, each run as a `loraflow-finetune` child.

    sweep(cfg, grid={"train.learning_rate": [1e-4, 2e-4], "lora.r": [4, 8]}, max_concurrent=2)

Every child config is validated before the first child starts (`loraflow.ops.sweep.plan_sweep`). The
children share the cached stages: each stage task is keyed by what determines it and guarded by a
file lock, so the data and tokenize stages are computed by one child and `Cached` for the others,
and the model stage once per distinct model/quantization/LoRA config. Each child is a child flow run
(`sweep-lr=0.0002-r=8`), at most `max_concurrent` at a time. A failed child is recorded in the
ranking with its error and does not stop the others. The sweep ends `Completed` if at least one
child completed (with a message naming the failed ones), and `Failed` only if every child failed.
`run.refresh` applies to every child: a refreshed shared stage is recomputed once per child.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import Completed
from pydantic import Field

from flows.finetune import finetune
from flows.pipeline import resolve_config
from loraflow.config import PipelineConfig, check_run_overrides, default_config
from loraflow.ops.sweep import Child, Metric, nest, plan_sweep, rank, ranking_rows, ranking_text


def _run_child(child: Child) -> dict[str, Any]:
    """Run one child flow; a failure becomes a row with its error instead of an exception."""
    record: dict[str, Any] = {"run": child.name, "values": child.values, "flow_run_id": None,
                              "metrics": None, "train": None, "adapter": None, "error": None}
    try:
        state = finetune.with_options(flow_run_name=child.name)(child.cfg, return_state=True)
    except Exception as err:  # noqa: BLE001 - the child never started: record why
        return {**record, "state": "Failed", "error": _one_line(err)}
    record["flow_run_id"] = str(state.state_details.flow_run_id)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        return {**record, "state": state.name, "error": _one_line(error) if isinstance(error, BaseException)
                else state.message or state.name}
    out = state.result()
    return {**record, "state": state.name, "metrics": out["metrics"], "train": out["train"], "adapter": out["adapter"]}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


@flow(name="loraflow-sweep")
def sweep(
    cfg: PipelineConfig = default_config(),
    grid: dict[str, list[Any]] | None = None,
    runs: list[dict[str, Any]] | None = None,
    max_concurrent: Annotated[int, Field(ge=1)] = 2,
    metric: Metric = "rougeL",
) -> dict[str, Any]:
    """Fine-tune one child run per combination of overrides, then rank the runs by ROUGE.

    Args:
        cfg: The base config every child starts from (in a deployment run, laid over the deployment's).
        grid: Dotted config keys mapped to lists of values; every combination is one run,
            e.g. {"train.learning_rate": [0.0001, 0.0002], "lora.r": [4, 8]} gives 4 runs.
        runs: Explicit runs appended after the grid's, each a dict of overrides, dotted or nested,
            e.g. [{"lora.r": 16, "lora.alpha": 32}, {"train": {"max_steps": 50}}].
        max_concurrent: How many child runs train at once (each loads its own model copy).
        metric: The fine-tuned model's ROUGE F1 on the validation split that ranks the runs (best first);
            test scores are reported beside it, never ranked by.
    """
    logger = get_run_logger()
    from prefect.runtime import deployment

    cfg = resolve_config(cfg)
    children = plan_sweep(cfg, grid, runs)  # raises before any child run when a child is invalid
    if deployment.id:  # a deployment run's grid and runs may set no more than its cfg may
        for child in children:
            check_run_overrides(nest(child.overrides), cfg)
    workers = min(max_concurrent, len(children))
    logger.info("sweep: %d runs, %d at a time: %s", len(children), workers, ", ".join(c.name for c in children))

    # Each thread gets its own copy of this flow's context, so every child is a child flow run of the sweep.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
        futures = [pool.submit(contextvars.copy_context().run, _run_child, c) for c in children]
        results = [f.result() for f in futures]

    ranked = rank(results, metric)
    rows = ranking_rows(ranked)
    _publish(rows, metric)
    logger.info("sweep ranking by fine-tuned validation %s F1 (x100):\n%s", metric, ranking_text(rows))
    failed = [r for r in ranked if r["state"] != "Completed"]
    summary = {"metric": metric, "best": ranked[0] if ranked[0]["rank"] == 1 else None,
               "ranking": ranked, "failed": [r["run"] for r in failed]}
    if len(failed) == len(ranked):
        raise RuntimeError(f"all {len(ranked)} sweep runs failed; first: {failed[0]['run']}: {failed[0]['error']}")
    if failed:
        message = f"{len(failed)} of {len(ranked)} runs failed: " + "; ".join(f"{r['run']} ({r['error']})" for r in failed)
        logger.warning("sweep: %s", message)
        return Completed(message=message[:1000], data=summary)  # the state the UI shows; callers still get `summary`
    return summary


def _publish(rows: list[dict[str, Any]], metric: str) -> None:
    from prefect.artifacts import create_table_artifact

    from loraflow.ops.report import artifact_prefix

    create_table_artifact(rows, key=f"{artifact_prefix()}-ranking",
                          description=f"Sweep runs ranked by the fine-tuned model's validation {metric} F1 (ROUGE x100, with its "
                                      "95% interval; test ROUGE beside it); "
                                      "failed runs last, with their error")
