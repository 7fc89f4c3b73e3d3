"""Every `transformers.TrainerCallback` the train stage adds to the Trainer, in one place.

Added by the training loop (`stage._run_training`): `throughput` (wall-clock marks for the benchmark) and
`save_last_step` (the final step is a checkpoint a longer run can continue from). Added by the training
process (`worker`): `stop_on_request` (SIGTERM or Ctrl-C: save at the step's end, then stop), `progress` (one
line per logging step the launcher turns into the Prefect progress artifact) and, when the flow run logs to
MLflow, `mlflow_curves` (every logged number into that MLflow run, as it comes).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

PROGRESS_MARK = "loraflow-progress "  # what the launcher looks for in the training process's output


def throughput():
    """Wall-clock marks of the training loop: start, first optimizer step, end (time.time(), for the benchmark)."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.update(begin=time.time(), begin_step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.setdefault("first_step_at", time.time())
            self.marks["end"] = time.time()

    return Throughput()


def save_last_step():
    """Checkpoint the final step too (not only every save_steps), so a longer run can continue from it."""
    from transformers import TrainerCallback

    class SaveLast(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = True

    return SaveLast()


def stop_on_request(requested: Callable[[], bool]):
    """Save a checkpoint and stop at the end of the step during which `requested()` became true."""
    from transformers import TrainerCallback

    class SaveAndStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if requested():
                control.should_save = True
                control.should_training_stop = True
            return control

    return SaveAndStop()


def print_marked(mark: str, value: object, stream) -> None:
    """Print one machine-readable line for the launcher (`launch._marked` reads it): `mark`, then `value` as JSON, in
    one write, so that another thread's output lands before or after it, never between it and its newline."""
    stream.write(mark + json.dumps(value) + "\n")
    stream.flush()


def progress():
    """Print one machine-readable line per logging step (`PROGRESS_MARK`); the launcher turns it into a progress
    artifact."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                line = {"step": state.global_step, "max_steps": state.max_steps, "loss": logs["loss"]}
                print_marked(PROGRESS_MARK, line, sys.stdout)

    return ReportProgress()


def mlflow_curves(spec: dict[str, str]):
    """Log every `on_log` number to the MLflow run `spec` names ({"uri", "run_id"}: `ops.tracking.handoff`)."""
    from mlflow.entities import Metric
    from transformers import TrainerCallback

    from loraflow.ops.tracking import client

    c = client(spec["uri"])

    class Curves(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, state.global_step) for k, v in logs.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
            if batch:
                c.log_batch(spec["run_id"], metrics=batch)

    return Curves()
