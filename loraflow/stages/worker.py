"""Child-process entry point for the train stage: `python -m loraflow.stages.worker REQUEST.json`.

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
import threading
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
ENV_LINE = "env "  # + {"set": {...}, "unset": [...]} as JSON on stdin: the run's environment, for a process started before it
DONE_MARK = "loraflow-done "  # + {"id", "result"} or {"id", "error"} as JSON: a stage asked of the process is done


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


def _freeze_imports() -> int:
    """Move what the imports created (~590k objects) out of the cyclic collector's sight (`gc.freeze`): every later
    full collection (the one before training, accelerate's at the loop's start, the automatic ones in the steps)
    then skips them, 0.24 s each on a 2-core Xeon. Refcounting still frees them; they are unfrozen at exit
    (`atexit`), so that the shutdown collection sees everything (nanobind reports what it misses as leaks).
    Returns how many objects were frozen."""
    import atexit
    import gc

    gc.freeze()
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()


def _check_ahead(folder: str) -> None:
    """`sources.check_converted`: the pre-flight then finds the folder checked (or waits for this check)."""
    from loraflow.store.sources import check_converted

    try:
        check_converted(Path(folder))
    except Exception:  # noqa: BLE001 - the pre-flight checks it again and reports what is wrong
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    process = {"started_early": bool(argv) and argv[0] == WAIT_FLAG, "started_at": time.time()}
    _log_to_stderr()
    built = None  # (model key, model) when the model stage was built here
    if process["started_early"]:  # SIGTERM while waiting ends the process (nothing to save yet)
        if len(argv) > 1:  # the run's converted model folder: checked while the main thread imports
            threading.Thread(target=_check_ahead, args=(argv[1],), daemon=True).start()
        _import_early()
        process["frozen_objects"] = _freeze_imports()
        process["imported_at"] = time.time()
        print("train worker: started early, imports done", file=sys.stderr, flush=True)
        served = _serve(process)
        if served is None:  # the run ended (or failed) before training: nothing to do
            return 0
        line, built = served
        process["request_at"] = time.time()
        argv = [line]
    Preemption.install()
    return _train(argv, process, built)


def _serve(process: dict) -> tuple[str, tuple[str, object] | None] | None:
    """Answer the stages the flow asks of this process before training (`launch.ask`: the pre-flight, tokenize,
    model), each in a thread of its own as it comes (the model loads while the data is tokenized), until the train
    request. Returns its path and (the model key, the model) if the model stage was built here; None when stdin
    closes first (the run ended before training)."""
    threads: list[threading.Thread] = []
    built: dict[str, tuple[str, object]] = {}
    while True:
        line = sys.stdin.readline().strip()
        if not line:
            return None
        if line.startswith(ENV_LINE):  # started before the run (`launch.prestart`): the run's hub token, say
            env = json.loads(line[len(ENV_LINE):])
            os.environ.update(env["set"])
            for name in env["unset"]:
                os.environ.pop(name, None)
            continue
        request = json.loads(Path(line).read_text())
        if request.get("kind") not in _STAGES:
            break
        Path(line).unlink(missing_ok=True)  # the launcher's temporary file: read, so done with
        process[f"{request['kind']}_request_at"] = time.time()
        threads.append(threading.Thread(target=_answer, args=(request, built), daemon=True))
        threads[-1].start()
    for thread in threads:  # training starts once what it may use is built
        thread.join()
    return line, built.get("model")


_PRINT = threading.Lock()


def _answer(request: dict, built: dict) -> None:
    """Run one stage asked of this process and print its answer after DONE_MARK: its result, or its error's type,
    module and message (the launcher raises it as that error in the stage's task; this process goes on waiting)."""
    try:
        result = _STAGES[request["kind"]](request)
        if request["kind"] == "model":
            model, result = result
            built["model"] = (request["key"], model)
        answer = {"id": request["id"], "result": result}
    except Exception as err:  # noqa: BLE001 - the stage's task raises it
        answer = {"id": request["id"], "error": {"type": type(err).__name__, "module": type(err).__module__,
                                                 "message": str(err)}}
    from loraflow.stages.train.callbacks import print_marked

    with _PRINT:
        print_marked(DONE_MARK, answer, sys.stderr)


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
    (the others typically fail because a peer's connection closed)."""
    from loraflow.stages.train.callbacks import print_marked
    from loraflow.stages.train.distributed import ERROR_MARK, rank

    where = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    report = {"at": time.time(), "error": f"{where}{type(err).__name__}: {err}".replace("\n", " ")}
    print_marked(ERROR_MARK, report, sys.stderr)


def _preflight(request: dict) -> dict:
    """The pre-flight checks (`stages.preflight.run_checks`); the report as a dict."""
    from dataclasses import asdict

    from loraflow.config import PipelineConfig
    from loraflow.stages.preflight import run_checks

    return asdict(run_checks(PipelineConfig.model_validate(request["cfg"]), request["checked_as"],
                             data_ahead=request.get("data_ahead")))


def _tokenize(request: dict) -> dict:
    """The tokenize stage into the request's folder (`stages.tokenize.run`); its summary."""
    from loraflow.config import ModelConfig, PromptConfig
    from loraflow.stages import tokenize
    from loraflow.store.artifacts import Handle

    return tokenize.run(Handle(**request["data"]), PromptConfig.model_validate(request["prompt"]),
                        ModelConfig.model_validate(request["model"]), Path(request["out"]), request["cache_dir"])


def _build_model(request: dict) -> tuple[object, dict]:
    """The model stage into the request's folder (`stages.model.build`, loaded as training loads it): the model,
    which training goes on with, and the stage's summary."""
    from loraflow.config import LoraConfig, ModelConfig, QuantizationConfig
    from loraflow.stages.model import build

    return build(ModelConfig.model_validate(request["model"]), QuantizationConfig.model_validate(request["quantization"]),
                 LoraConfig.model_validate(request["lora"]), Path(request["out"]), request["cache_dir"], training=True)


_STAGES = {"preflight": _preflight, "tokenize": _tokenize, "model": _build_model}


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
