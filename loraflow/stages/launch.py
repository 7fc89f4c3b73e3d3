"""Run the train stage in a child process and stream its output into our log.

When the train stage will run, that process starts with the run (`early_start`), and the stages before training
that need torch (the pre-flight, tokenize, model) run in it too (`ask`, `start_model_build`, `build_model`): the
flow process imports no torch before training, and the model is loaded once per run.

The child's output goes through unchanged to our stderr (so progress bars draw in a terminal), and
its complete lines, minus progress-bar redraws, go to the `loraflow` logger (so they appear in the
Prefect task log). If we are interrupted or cancelled the child is terminated (SIGTERM: it saves a
checkpoint first), and it also gets SIGTERM if this process dies (Linux parent-death signal).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from loraflow.store.artifacts import Handle
from loraflow.config import LoraConfig, ModelConfig, PipelineConfig, QuantizationConfig
from loraflow.hardware import KERNEL_CACHES
from loraflow.procs import wait_exit
from loraflow.stages.train.distributed import ERROR_MARK, worker_command
from loraflow.stages.train.callbacks import PROGRESS_MARK
from loraflow.stages.worker import DONE_MARK, ENV_LINE, WAIT_FLAG

if TYPE_CHECKING:
    from loraflow.store import StageKey

log = logging.getLogger("loraflow")
_PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm redraw: "42%|████      | 10/24 [...]"


INTERRUPT_GRACE_SECONDS = 6  # how long a Ctrl-C waits for the training process to save its checkpoint


class WorkerFailed(RuntimeError):
    """The training process failed; the message carries its exit code and last output lines."""


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: cancellation still terminates the child through the finally block


_MARKS = tuple(mark.encode() for mark in (PROGRESS_MARK, ERROR_MARK, DONE_MARK))


class _Output:
    """A training process's output, read by one task at a time (`_forward`); the bytes read past the line a reader
    stopped at (another answer, the first lines of training) wait here for the next reader."""

    def __init__(self, stream) -> None:
        # Reentrant: `_await` holds it from its look for a kept answer to its keeping another's (`_forward` takes it
        # too), so no task starts reading for an answer another reader has already kept for it.
        self.stream, self.buf, self.shown, self.lock = stream, b"", 0, threading.RLock()


_OUTPUTS: weakref.WeakKeyDictionary[subprocess.Popen, _Output] = weakref.WeakKeyDictionary()


def _output(proc: subprocess.Popen) -> _Output:
    with _EARLY_LOCK:
        return _OUTPUTS.setdefault(proc, _Output(proc.stdout))


def _showable(partial: bytes) -> int:
    """How much of a line not ended yet can be shown now: up to a mark, or up to a tail that may start one."""
    cut = len(partial)
    for mark in _MARKS:
        at = partial.find(mark)
        if at < 0:
            at = next((len(partial) - k for k in range(min(len(mark) - 1, len(partial)), 0, -1)
                       if partial.endswith(mark[:k])), len(partial))
        cut = min(cut, at)
    return cut


def _show(data: bytes) -> None:
    if not data:
        return
    if hasattr(sys.stderr, "buffer"):
        sys.stderr.buffer.write(data)
    else:  # a text-only stderr (redirected)
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()


def _forward(out: _Output, tail: deque, errors: list[dict], on_progress: Callable[[dict], None] | None = None,
             until: str | None = None) -> dict | None:
    """Copy the training process's output to our stderr, as it comes and without our marked lines (progress, errors,
    answers), and its lines to our log, until it ends; or, with `until`, until a line with that mark (returns the
    JSON after it; None if the output ended first)."""
    with out.lock:
        while True:
            while b"\n" in out.buf:
                raw, out.buf = out.buf.split(b"\n", 1)
                shown, out.shown = out.shown, 0
                marked = _marked(raw)
                if marked is None:
                    _show(raw[shown:] + b"\n")
                    line = raw.decode(errors="replace").split("\r")[-1].rstrip()
                    if line and not _PROGRESS.search(line):
                        tail.append(line)
                        log.info("%s", line)
                    continue
                at, mark, value, rest = marked
                _show(raw[shown:at])  # a progress bar drawn without a newline may precede a marked line
                if rest.strip():  # another thread of the process wrote after it before its newline: a line of its own
                    out.buf = rest + b"\n" + out.buf
                if mark == until:
                    return value  # the process now waits for its next request
                if mark == PROGRESS_MARK and on_progress is not None:
                    try:
                        on_progress(value)
                    except Exception as err:  # noqa: BLE001 - a report must never stop training
                        log.warning("train: progress report failed (%s)", err)
                elif mark == ERROR_MARK:
                    errors.append(value)
                    log.error("%s", value["error"])
            showable = _showable(out.buf)  # a progress bar redrawn with \r shows as it is drawn
            if showable > out.shown:
                _show(out.buf[out.shown:showable])
                out.shown = showable
            stream = out.stream
            if stream.closed:  # another task saw the output end and closed it
                return None
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                return None
            out.buf += chunk


_JSON = json.JSONDecoder()


def _marked(raw: bytes) -> tuple[int, str, Any, bytes] | None:
    """The first marked object on a line of the training process's output: where its mark starts, the mark, the JSON
    value after it, and what follows that value (another thread may write there before the line's newline); None
    for a line with no mark, or whose value does not parse (it is then an ordinary line)."""
    found = [(at, mark) for mark in _MARKS if (at := raw.find(mark)) >= 0]
    if not found:
        return None
    at, mark = min(found)
    body = raw[at + len(mark):].decode(errors="replace")
    try:
        value, end = _JSON.raw_decode(body)
    except ValueError:
        return None
    return at, mark.decode(), value, body[end:].encode()


# Training processes started early, by train key, until the train stage claims its own (loraflow.stages.launch.early_start).
_EARLY: dict[str, subprocess.Popen] = {}
# The model stage each is building ahead of the model task (`start_model_build`), by train key: (model key, folder,
# request id).
_BUILDING: dict[str, tuple[str, Path, str]] = {}
# Answers read from each while a task waited for another one's, by train key, then request id (`_await`).
_ANSWERS: dict[str, dict[str, dict]] = {}
_EARLY_LOCK = threading.Lock()


def _child_env() -> dict[str, str]:
    """The environment a training process gets (a prestarted one is handed what changed in it since: `_adopt`):
    ours, with oneDNN's kernel caches bounded (`hardware.KERNEL_CACHES`) unless it sets them itself."""
    return {**KERNEL_CACHES, **os.environ, "PYTHONUNBUFFERED": "1"}


def _spawn(command: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(),
                            preexec_fn=_die_with_parent, **kw)


def _spawn_waiting(cfg: PipelineConfig) -> subprocess.Popen:
    """A training process that imports, then waits for its requests on stdin (`worker.WAIT_FLAG`). While it
    imports, a thread of it reads the run's converted GGUF folder against its manifest (`sources.check_converted`,
    ~0.4 s for SmolLM2's), which its pre-flight would otherwise do after the imports, on the way to the first step."""
    from loraflow.store.sources import converted_dir

    ahead = converted_dir(cfg.model.name_or_path, cfg.run.cache_dir)
    return _spawn([sys.executable, "-m", "loraflow.stages.worker", WAIT_FLAG, *([str(ahead)] if ahead else [])],
                  stdin=subprocess.PIPE)


def _will_run(cfg: PipelineConfig, output_dir: str | Path, stage: str, key: str) -> bool:
    """Whether stage `stage` (key `key`) will compute (`store.will_build`, with this run's refresh)."""
    from loraflow import store

    return store.will_build(output_dir, stage, key, cfg.run.refreshes(stage))


def _early_key(cfg: PipelineConfig, output_dir: str | Path, train_key: str) -> str | None:
    """`train_key` when the train stage will run in one local process, else None."""
    from loraflow.store.remote import is_url

    if not cfg.train.early_start or is_url(cfg.run.output_dir) or cfg.train.num_processes != 1:
        return None
    return train_key if _will_run(cfg, output_dir, "train", train_key) else None


# A training process the command line started before the flow run (`prestart`), and the environment it got.
_PRESTARTED: list[tuple[subprocess.Popen, dict[str, str]]] = []
# What may differ between that environment and the run's when the run adopts the process: read when used, not when
# imported (the hub token the flow reads from a Prefect Secret; Prefect's settings, which it does not import).
_LATE_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_LATE_ENV_PREFIXES = ("PREFECT_",)


def prestart(cfg: PipelineConfig) -> None:
    """Start the training process before the flow run, from `loraflow run`: its imports then begin ~1.5 s earlier,
    while this process imports Prefect and starts the run. The run's `early_start` adopts it if training will run
    (handing it the run's environment: the hub token from a Prefect Secret), else it is ended (`retire_prestarted`)."""
    from loraflow.store.remote import is_url

    if not cfg.train.early_start or cfg.train.num_processes not in (1, "auto") or is_url(cfg.run.output_dir):
        return  # ('auto' is one process but with several GPUs, which the run resolves: then it is ended)
    with _EARLY_LOCK:
        if not _PRESTARTED:
            _PRESTARTED.append((_spawn_waiting(cfg), _child_env()))


def retire_prestarted() -> None:
    """End a prestarted process no run adopted (the run was a cache hit, or stopped before training)."""
    with _EARLY_LOCK:
        taken = _PRESTARTED[:]
        _PRESTARTED.clear()
    for proc, _ in taken:
        _retire(proc)


def _adopt() -> subprocess.Popen | None:
    """The prestarted process, handed the changes to the environment since it started (on its stdin: the token is
    never written to a file); None when there is none, it is gone, or a change could not reach what it imported."""
    if not _PRESTARTED:
        return None
    proc, env = _PRESTARTED.pop()
    now = _child_env()
    changed = {k: v for k, v in now.items() if env.get(k) != v}
    unset = [k for k in env if k not in now]
    late = [k for k in [*changed, *unset] if k not in _LATE_ENV and not k.startswith(_LATE_ENV_PREFIXES)]
    if late or proc.poll() is not None:
        log.info("train: not using the process started before the run (%s): starting a new one",
                 f"the environment changed since: {', '.join(sorted(late))}" if late else "it has exited")
        _retire(proc)
        return None
    try:
        proc.stdin.write(f"{ENV_LINE}{json.dumps({'set': changed, 'unset': unset})}\n".encode())
        proc.stdin.flush()
    except OSError:
        _retire(proc)
        return None
    return proc


@contextmanager
def early_start(cfg: PipelineConfig, output_dir: str | Path, train_key: str | None) -> Iterator[str | None]:
    """Start the training process now if the train stage (key `train_key`) will run, so its imports (torch,
    transformers, peft: ~10-20 s on a small CPU) overlap the stages before it; `run_train_worker` hands it the
    request. Yields `train_key` when this block started it, for `ask` and `start_model_build` (only the run that
    started a process sends it stages: one reader of its output), else None. A process nobody claimed is ended
    when the block exits (the run failed or stopped before training)."""
    try:
        key = _early_key(cfg, output_dir, train_key) if train_key else None
    except Exception as err:  # noqa: BLE001 - the stage that needs the input reports it properly
        log.debug("train: not started early (%s)", err)
        key = None
    if key is not None:
        with _EARLY_LOCK:
            if key not in _EARLY:
                _EARLY[key] = _adopt() or _spawn_waiting(cfg)
            else:
                key = None  # another run of the same config in this process started it: that run owns it
    if key is None:
        retire_prestarted()  # training will not run here: a process the command line started is not needed
    try:
        yield key
    finally:
        with _EARLY_LOCK:
            proc = _EARLY.pop(key, None) if key is not None else None
            building = _BUILDING.pop(key, None) if key is not None else None
            _ANSWERS.pop(key, None)
        if proc is not None:
            _retire(proc)
        if building is not None:  # built ahead, never collected (the run stopped, or the stage was a hit)
            shutil.rmtree(building[1], ignore_errors=True)


def _retire(proc: subprocess.Popen) -> None:
    """End an early-started process that got no request, at once: it has nothing to save (SIGTERM before a request
    ends it; one still importing would otherwise hold up a run that is stopping)."""
    try:
        proc.stdin.close()
        proc.terminate()
        proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    finally:
        proc.stdout.close()


def _send(proc: subprocess.Popen, request: dict) -> str | None:
    """Send the early-started process `request` (a stage to run, `worker._STAGES`); its id, or None if it is gone."""
    request = {**request, "id": uuid.uuid4().hex}
    fd, path = tempfile.mkstemp(prefix=f"loraflow-{request['kind']}-request-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(request, fh)
    try:
        if proc.poll() is not None:
            raise OSError(f"exited with code {proc.returncode}")
        proc.stdin.write(f"{path}\n".encode())
        proc.stdin.flush()
    except OSError:
        Path(path).unlink(missing_ok=True)
        return None
    return request["id"]


def _await(train_key: str, proc: subprocess.Popen, request_id: str, stage: str) -> dict:
    """The result of request `request_id` to the early-started process, read from its output (another request's
    answer read on the way is kept for its own task). A stage's error is raised here as that error (a ModelError
    or PromptError names its fix); a process that ended is WorkerFailed."""
    tail: deque[str] = deque(maxlen=20)
    errors: list[dict] = []
    out = _output(proc)
    while True:
        with out.lock:  # look for a kept answer, read, and keep another's, as one reader
            with _EARLY_LOCK:
                answer = _ANSWERS.get(train_key, {}).pop(request_id, None)
            if answer is None:
                answer = _forward(out, tail, errors, until=DONE_MARK)
                if answer is not None and answer["id"] != request_id:
                    with _EARLY_LOCK:
                        _ANSWERS.setdefault(train_key, {})[answer["id"]] = answer
                    continue
        break
    if answer is None:  # the output ended: the process is gone
        with _EARLY_LOCK:
            _EARLY.pop(train_key, None)
        code = proc.wait()
        proc.stdout.close()
        raise WorkerFailed(f"{stage}: the training process running it (exit code {code}) failed: {_cause(errors, tail)}")
    if "error" in answer:
        raise _as_raised(answer["error"], stage)
    return answer["result"]


def _as_raised(error: dict, stage: str) -> Exception:
    """The exception a stage raised in the training process, as the same type when it is loraflow's own or a
    built-in one (its message names the fix), else WorkerFailed quoting it."""
    import builtins
    import importlib

    module, name, message = error["module"], error["type"], error["message"]
    cls = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module.split(".")[0] == "loraflow":
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            pass
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - a type that cannot be rebuilt from its message: quoted instead
            pass
    return WorkerFailed(f"{stage}: in the training process: {name}: {message}")


def ask(train_key: str | None, stage: str, request: dict) -> dict | None:
    """Run `stage` (`worker._STAGES`: preflight, tokenize, model) in the training process started early for
    `train_key` (what `early_start` yielded to the run that started it), so this process never imports torch
    before training; returns its result, or None when there is no such process (the caller runs the stage
    itself). Stages asked run side by side there."""
    with _EARLY_LOCK:
        proc = _EARLY.get(train_key) if train_key else None
    if proc is None or (request_id := _send(proc, {**request, "kind": stage})) is None:
        return None
    return _await(train_key, proc, request_id, stage)


def _model_request(model_key: str, model: ModelConfig, quant: QuantizationConfig, lora: LoraConfig, out: Path,
                   cache_dir: str | None) -> dict:
    return {"kind": "model", "key": model_key, "model": model.model_dump(mode="json"),
            "quantization": quant.model_dump(mode="json"), "lora": lora.model_dump(mode="json"), "out": str(out),
            "cache_dir": cache_dir}


def start_model_build(cfg: PipelineConfig, output_dir: str | Path, train_key: str | None, model_key: str) -> None:
    """Have the training process started early for `train_key` build the model stage (key `model_key`) now, if it
    will run, into a folder of its own; the model task collects it (`build_model`). Called once the pre-flight has
    passed: the model loads while the data and tokenize stages run."""
    with _EARLY_LOCK:
        proc = _EARLY.get(train_key) if train_key else None
        if proc is None or train_key in _BUILDING or proc.poll() is not None:
            return
        if not _will_run(cfg, output_dir, "model", model_key):
            return  # a hit: training loads the stage's adapter as before
        folder = Path(tempfile.mkdtemp(prefix="loraflow-model-"))
        request_id = _send(proc, _model_request(model_key, cfg.model, cfg.quantization, cfg.lora, folder / "stage",
                                                cfg.run.cache_dir))
        if request_id is not None:
            _BUILDING[train_key] = (model_key, folder, request_id)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def build_model(train_key: str | None, model_key: str, model: ModelConfig, quant: QuantizationConfig,
                lora: LoraConfig, out: Path, cache_dir: str | None) -> dict | None:
    """The model stage's `run`, in the training process started early for `train_key` (`early_start`), if there is
    one: it builds the stage (or has built it, `start_model_build`) and keeps the model, which training then uses
    as built (the base is loaded and quantized once per run); what it wrote is moved into `out`. Returns the stage's
    summary, or None when there is no such process (the caller builds the stage itself). A failure is raised as the
    stage's own error (a ModelError names its fix)."""
    with _EARLY_LOCK:
        proc = _EARLY.get(train_key) if train_key else None
        building = _BUILDING.pop(train_key, None) if proc is not None else None
    if building is not None and building[0] != model_key:
        shutil.rmtree(building[1], ignore_errors=True)
        building = None
    if building is None:
        summary = ask(train_key, "model", _model_request(model_key, model, quant, lora, out, cache_dir))
    else:
        try:
            summary = _await(train_key, proc, building[2], "model")
            for item in (building[1] / "stage").iterdir():
                shutil.move(str(item), out / item.name)
        finally:
            shutil.rmtree(building[1], ignore_errors=True)
    if summary is not None:
        log.info("model: built in the training process started with the run (training then uses it as built)")
    return summary


def _cause(errors: list[dict], tail: deque) -> str:
    """The line that explains a failed training process: the earliest rank's reported error, else the last output
    line that mentions an error, else its last line."""
    if errors:
        return min(errors, key=lambda e: e["at"])["error"]
    return next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")


def _claim(key: str, request: Path) -> subprocess.Popen | None:
    """The early-started process for `key`, given its request, or None (none started, or it died)."""
    with _EARLY_LOCK:
        proc = _EARLY.pop(key, None)
    if proc is None:
        return None
    try:
        if proc.poll() is not None:
            raise OSError(f"exited with code {proc.returncode}")
        proc.stdin.write(f"{request}\n".encode())
        proc.stdin.close()
    except OSError as err:
        log.info("train: the early-started training process is gone (%s): starting a new one", err)
        _retire(proc)
        return None
    log.info("train: using the training process started with the run (its imports overlapped the earlier stages)")
    return proc


def worker_request(cfg: PipelineConfig, tokenized: Handle, model: Handle, output_dir: str | Path, result: Path,
                   key: StageKey, tracking: dict | None = None) -> dict:
    """What `python -m loraflow.stages.worker REQUEST` reads: the run's config (resolved), its inputs, its
    train key (the worker computes no key), where to write, and the MLflow run to log to."""
    return {"cfg": cfg.model_dump(mode="json"), "tokenized": tokenized.model_dump(), "model": model.model_dump(),
            "output_dir": str(output_dir), "result": str(result), "tracking": tracking,
            "key": {"stage": key.stage, "parts": key.parts}}


def run_train_worker(cfg: PipelineConfig, tokenized: Handle, model: Handle, output_dir: str | Path, key: StageKey,
                     on_progress: Callable[[dict], None] | None = None, early: str | None = None) -> Handle:
    """Train in `python -m loraflow.stages.worker` (through torchrun with train.num_processes > 1); returns
    the train handle or raises WorkerFailed naming the first rank's error.

    `key`: the run's train key (`store.chain`), handed to the training process in its request; `cfg` is resolved
    (`hardware.resolve`). `on_progress` gets {"step", "max_steps", "loss"} at every logging step. `early`: what
    this run's `early_start` yielded: the process it started is used (only by that run: another run of the same
    config may be asking it a stage right now), else a new one starts."""
    from loraflow import store
    from loraflow.ops.tracking import handoff
    from loraflow.stages.train.stage import finished_train, seed_continuation

    processes = cfg.train.num_processes
    done = finished_train(cfg, output_dir, key.key)
    if done is not None:  # e.g. Prefect's records were cleared: no worker
        log.info("train: reusing %s", done.path)
        return done
    if cfg.run.refreshes("train"):  # from scratch: the old checkpoints are set aside, not resumed from
        work = store.work_dir(output_dir, key.key)
        if work.exists():
            aside = work.with_name(f"{work.name}.set-aside-{int(time.time())}")
            work.rename(aside)
            log.info("train: refresh: checkpoints set aside in %s", aside)
    else:
        seed_continuation(cfg, output_dir, key)
    with tempfile.TemporaryDirectory(prefix="loraflow-train-") as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        request.write_text(json.dumps(worker_request(cfg, tokenized, model, output_dir, result, key, handoff())))
        if processes > 1:
            log.info("train: %d processes (DDP) through torchrun", processes)
        claimed = _claim(key.key, request) if early == key.key else None
        proc = claimed or _spawn(worker_command(processes, str(request)))
        tail: deque[str] = deque(maxlen=20)
        errors: list[dict] = []  # {"at": time, "error": "rank N: Type: message"} from each failing rank
        try:
            _forward(_output(proc), tail, errors, on_progress)
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C: the child got it too and saves at its step's end; wait only briefly
            if wait_exit(proc, INTERRUPT_GRACE_SECONDS) is None:  # (Popen.wait is unsound after an interrupt)
                proc.kill()
            raise
        finally:
            if wait_exit(proc, 0) is None:  # we were interrupted or cancelled: let it checkpoint, then make sure
                proc.terminate()
                if wait_exit(proc, 120) is None:
                    proc.kill()
        if code != 0:
            what = "was stopped (SIGTERM) after saving a checkpoint; rerun to resume" if code == 143 else (
                "was killed (out of memory?)" if code in (-9, 137) else f"failed: {_cause(errors, tail)}")
            raise WorkerFailed(f"train: the training process (exit code {code}) {what}")
        return Handle.model_validate_json(result.read_text())
