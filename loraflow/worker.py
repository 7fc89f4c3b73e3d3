"""Child-process entry point for the train stage: `python -m loraflow.worker REQUEST.json`.

Training runs in its own process so GPU memory is released when it ends, an out-of-memory kill fails
one task instead of the flow process, and a cancelled run can be stopped with a signal.
On SIGTERM (cancellation, a preempted spot GPU, an evicted pod) it saves a checkpoint at the end of
the current step and exits with code 143, so the rerun resumes without losing a finished step.
With train.num_processes > 1, torchrun starts one of these per rank (see `loraflow.distributed`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a terminated process


class Preemption:
    """Set by SIGTERM; the Trainer callback turns it into save-then-stop at the next step boundary."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True
            print("train worker: SIGTERM received, saving a checkpoint after this step", file=sys.stderr, flush=True)

        signal.signal(signal.SIGTERM, handler)


def preemption_callback():
    from transformers import TrainerCallback

    class SaveAndStopOnSigterm(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if Preemption.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    return SaveAndStopOnSigterm()


PROGRESS_MARK = "loraflow-progress "


def progress_callback():
    """Print one machine-readable line per logging step; the parent turns it into a progress artifact."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                line = {"step": state.global_step, "max_steps": state.max_steps, "loss": logs["loss"]}
                print(PROGRESS_MARK + json.dumps(line), flush=True)

    return ReportProgress()


def main(argv: list[str] | None = None) -> int:
    from loraflow.artifacts import Handle
    from loraflow.config import PipelineConfig
    from loraflow.distributed import ERROR_MARK, rank
    from loraflow.training import Preempted, train_adapter

    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    Preemption.install()
    cfg = PipelineConfig.model_validate(request["cfg"])
    try:
        handle = train_adapter(
            cfg, Handle(**request["tokenized"]), Handle(**request["model"]), request["output_dir"],
            callbacks=[preemption_callback(), progress_callback()], stop_requested=lambda: Preemption.requested,
        )
    except Preempted as err:
        print(f"train worker: {err}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except Exception as err:
        # One line the launcher can quote: under torchrun, every rank that fails reports, and the earliest
        # is the cause (the others typically fail because a peer's connection closed).
        where = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        report = {"at": time.time(), "error": f"{where}{type(err).__name__}: {err}".replace("\n", " ")}
        print(ERROR_MARK + json.dumps(report), file=sys.stderr, flush=True)
        raise
    if handle is not None:  # rank 0 (the only rank in a single process) publishes the result
        Path(request["result"]).write_text(handle.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
