"""Child-process entry point for the train stage: `python -m loraflow.stages.train.worker REQUEST.json`.

Training runs in its own process so GPU memory is released when it ends, an out-of-memory kill fails
one task instead of the flow process, and a cancelled run can be stopped with a signal.
On SIGTERM (cancellation, a preempted spot GPU, an evicted pod) it saves a checkpoint at the end of
the current step and exits with code 143, so the rerun resumes without losing a finished step.
With train.num_processes > 1, torchrun starts one of these per rank (see `loraflow.stages.train.distributed`).
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
    """Set by SIGTERM, or SIGINT (a Ctrl-C in the terminal reaches the whole process group); the Trainer callback
    turns it into save-then-stop at the next step boundary. A second SIGINT stops at once."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            if signum == signal.SIGINT and cls.requested:
                raise KeyboardInterrupt
            cls.requested = True
            name = signal.Signals(signum).name
            print(f"train worker: {name} received, saving a checkpoint after this step", file=sys.stderr, flush=True)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


WAIT_FLAG = "--wait"  # started early (`launch.early_start`): import, then read request paths on stdin
MODEL_MARK = "loraflow-model-built "  # + the model stage's summary as JSON: the stage is built (`launch.build_model`)


def _import_early() -> None:
    """What training imports, while the flow's earlier stages run (a missing optional library fails later, where
    it is used, with that stage's message)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401

    import loraflow.stages.model  # noqa: F401
    import loraflow.stages.train.trainer  # noqa: F401
    import loraflow.stages.train.stage  # noqa: F401

    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - reported by the model loader, if 4-bit is asked for
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    process = {"started_early": bool(argv) and argv[0] == WAIT_FLAG, "started_at": time.time()}
    _log_to_stderr()
    built = None  # (model key, model) when the model stage was built here
    if process["started_early"]:  # SIGTERM while waiting ends the process (nothing to save yet)
        _import_early()
        process["imported_at"] = time.time()
        print("train worker: started early, imports done", file=sys.stderr, flush=True)
        while True:
            line = sys.stdin.readline().strip()
            if not line:  # the run ended (or failed) before training: nothing to do
                return 0
            request = json.loads(Path(line).read_text())
            if request.get("kind") != "model":
                break
            Path(line).unlink(missing_ok=True)  # the launcher's temporary file: read, so done with
            process["model_request_at"] = time.time()
            built = _build_model(request)
            if built is None:
                return 1
        process["request_at"] = time.time()
        argv = [line]
    Preemption.install()
    return _train(argv, process, built)


def _log_to_stderr() -> None:
    """The stages' `loraflow` log lines on stderr, which the launcher copies into the task's log."""
    import logging

    logger = logging.getLogger("loraflow")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _report(err: BaseException) -> None:
    """One line the launcher can quote: under torchrun, every rank that fails reports, and the earliest is the cause
    (the others typically fail because a peer's connection closed). `type` lets the launcher raise a model stage's
    own error as that error."""
    from loraflow.stages.train.distributed import ERROR_MARK, rank

    where = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    report = {"at": time.time(), "error": f"{where}{type(err).__name__}: {err}".replace("\n", " "),
              "type": type(err).__name__, "message": str(err)}
    print(ERROR_MARK + json.dumps(report), file=sys.stderr, flush=True)


def _build_model(request: dict) -> tuple[str, object] | None:
    """The model stage, built here into the request's folder (`stages.model.build`, loaded as training loads it);
    its summary printed after MODEL_MARK. Returns (the model key, the model), or None when it failed (reported)."""
    from loraflow.config import LoraConfig, ModelConfig, QuantizationConfig
    from loraflow.stages.model import build

    try:
        model, summary = build(ModelConfig.model_validate(request["model"]),
                               QuantizationConfig.model_validate(request["quantization"]),
                               LoraConfig.model_validate(request["lora"]), Path(request["out"]), request["cache_dir"],
                               training=True)
    except Exception as err:  # noqa: BLE001 - reported to the launcher, which raises it in the model task
        _report(err)
        return None
    print(MODEL_MARK + json.dumps(summary), file=sys.stderr, flush=True)
    return request["key"], model


def _train(argv: list[str], process: dict, built: tuple[str, object] | None = None) -> int:
    from loraflow.store.artifacts import Handle
    from loraflow.config import PipelineConfig
    from loraflow.store import StageKey
    from loraflow.stages.train.stage import Preempted, train_adapter

    request = json.loads(Path(argv[0]).read_text())
    cfg = PipelineConfig.model_validate(request["cfg"])
    from loraflow.stages.train import callbacks as cb

    callbacks = [cb.stop_on_request(lambda: Preemption.requested), cb.progress()]
    if request.get("tracking"):  # the flow run's MLflow run: the curves are logged there as they come
        callbacks.append(cb.mlflow_curves(request["tracking"]))
    model_handle = Handle(**request["model"])
    try:
        handle = train_adapter(
            cfg, Handle(**request["tokenized"]), model_handle, request["output_dir"],
            StageKey(**request["key"]), callbacks=callbacks, stop_requested=lambda: Preemption.requested,
            process=process, built=built[1] if built and built[0] == model_handle.fingerprint else None,
        )
    except Preempted as err:
        print(f"train worker: {err}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except Exception as err:
        _report(err)
        raise
    if handle is not None:  # rank 0 (the only rank in a single process) publishes the result
        Path(request["result"]).write_text(handle.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
