"""The stage store: one key per stage, the folder it names, and what is known about each folder.

A stage's key is a hash of exactly what shapes its result: its config section's result-shaping fields
(`config.key_fields`), the keys of the stages it reads, the content identity of external inputs (data
files, model weights, a hub source's commit), the source of the stage's modules and the versions of
the libraries behind the numbers (`codehash`). It is computed here and nowhere else: a run computes its
stages' keys once (`chain`) and hands each stage its key.

The stage writes `<output_dir>/<stage>/<key>/`; Prefect's cache key is that folder's address
(`prefect_key`), so a hit, a miss and the log line can never disagree. Next to the folders,
`<output_dir>/.store/<stage>/<key>.json` remembers what each key was made of, when it was made and
last used, and by which run: `explain` (a miss's log line, `loraflow cache why`) compares against the
nearest earlier key and `loraflow cache ls|gc` read it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from loraflow.store.artifacts import Handle, Rejected, atomic_dir, fingerprint, is_complete, stage_dir, verify, write_json
from loraflow.store.codehash import code_identity
from loraflow.hardware import return_freed_memory
from loraflow.config import DataConfig, LoraConfig, ModelConfig, PipelineConfig, PromptConfig, QuantizationConfig, flatten, key_fields
from loraflow.procs import gone, identity
from loraflow.store.remote import download, is_url, local_path, local_root, remote_folder, upload

STAGES = ("data", "tokenize", "model", "train", "evaluate", "export")  # export: optional, after evaluate
INFO = "info.json"  # a stage folder's summary: its handle's `info` (`build`)


@dataclass(frozen=True)
class StageKey:
    """A stage's key and the parts it hashes (JSON-ready, for explaining a miss)."""

    stage: str
    parts: dict[str, Any] = field(hash=False)

    @property
    def key(self) -> str:
        return fingerprint(self.stage, self.parts)


def _make(stage: str, parts: dict[str, Any]) -> StageKey:
    return StageKey(stage, json.loads(json.dumps({**parts, **code_identity(stage)}, sort_keys=True, default=str)))


def data_key(data: DataConfig) -> StageKey:
    from loraflow.store.sources import source_fingerprint

    return _make("data", {"data": key_fields(data), "source content": source_fingerprint(data)})


def tokenize_key(data_key_: str, prompt: PromptConfig, tokenizer_source: str) -> StageKey:
    """`tokenizer_source`: `sources.source_identity` of the model whose tokenizer is used."""
    return _make("tokenize", {"upstream data": data_key_, "prompt": key_fields(prompt),
                              "tokenizer source": tokenizer_source})


def model_key(model: ModelConfig, quant: QuantizationConfig, lora: LoraConfig) -> StageKey:
    """`quant` resolved (`hardware.resolve`), as in every key below: 'auto' never reaches a key."""
    from loraflow.store.sources import source_identity

    return _make("model", {"model": key_fields(model), "quantization": key_fields(_resolved(quant, "compute_dtype")),
                           "lora": key_fields(lora), "model source": source_identity(model.name_or_path, model.revision)})


def train_key(cfg: PipelineConfig, tokenized: str, model: str) -> StageKey:
    return _make("train", {"upstream tokenize": tokenized, "upstream model": model,
                           "train": key_fields(_resolved(cfg.train, "num_processes")),
                           "quantization.compute_dtype": _resolved(cfg.quantization, "compute_dtype").compute_dtype})


def continuation(sk: StageKey) -> str:
    """The train key `sk` without its length: runs that differ only in `max_steps` / `num_train_epochs` share it
    (`stages.train.stage.seed_continuation` continues the longest shorter one)."""
    train = {k: v for k, v in sk.parts["train"].items() if k not in ("max_steps", "num_train_epochs")}
    return fingerprint("train", {**sk.parts, "train": train})


def evaluate_key(cfg: PipelineConfig, tokenized: str, model: str, trained: str) -> StageKey:
    # export.parity_samples: the rows whose logits and greedy outputs the stage records (`loraflow.stages.parity`)
    return _make("evaluate", {"upstream tokenize": tokenized, "upstream model": model, "upstream train": trained,
                              "eval": key_fields(cfg.eval), "export.parity_samples": cfg.export.parity_samples,
                              "quantization.compute_dtype": _resolved(cfg.quantization, "compute_dtype").compute_dtype})


def export_key(cfg: PipelineConfig, evaluated: str) -> StageKey:
    """`evaluated`: the evaluate key, which holds the adapter's (train), the base's (model) and the reference's."""
    return _make("export", {"upstream evaluate": evaluated, "export": key_fields(_resolved(cfg.export, "dtype"))})


def _resolved(section, name: str):
    """`section`, refused when its `name` is still 'auto': keys are made of a resolved config only."""
    if getattr(section, name) == "auto":
        raise ValueError(f"a stage key was asked for with {name}: auto; resolve the config first (hardware.resolve)")
    return section


def chain(cfg: PipelineConfig) -> dict[str, StageKey]:
    """Every stage's key for `cfg`, computed without running anything (upstream keys stand for upstream results).
    A run computes this once (`flows.pipeline.run_stages`) and hands each stage its key as a task argument; the
    training process receives its key in its request."""
    from loraflow.store.sources import source_identity

    data = data_key(cfg.data)
    tokenize = tokenize_key(data.key, cfg.prompt, source_identity(cfg.model.name_or_path, cfg.model.revision))
    model = model_key(cfg.model, cfg.quantization, cfg.lora)
    train = train_key(cfg, tokenize.key, model.key)
    evaluate = evaluate_key(cfg, tokenize.key, model.key, train.key)
    return {k.stage: k for k in (data, tokenize, model, train, evaluate)}


def preflight_key(cfg: PipelineConfig, evaluated: str) -> StageKey:
    """The pre-flight checks' key (`loraflow.stages.preflight`): what they read, through the evaluate key `evaluated`
    (every stage's inputs), and the run-only setting the memory check reads."""
    return _make("preflight", {"upstream evaluate": evaluated, "gradient checkpointing": cfg.train.gradient_checkpointing})


# -- folders ---------------------------------------------------------------------------------------

def folder(output_dir: str | Path, stage: str, key: str) -> Path:
    return stage_dir(output_dir, stage, key)


def work_dir(output_dir: str | Path, key: str) -> Path:
    """Where a train stage keeps its checkpoints while it runs (and after a crash, to resume from)."""
    return folder(output_dir, "train", key).with_name(f"{key}.work")


def location(output_dir: str) -> str:
    return output_dir.rstrip("/") if is_url(output_dir) else str(local_path(output_dir))


def prefect_key(stage: str, key: str, output_dir: str) -> str:
    """Prefect's cache key for the folder `<output_dir>/<stage>/<key>`: the stage, its key, and which output folder."""
    return f"loraflow-{stage}-{key}-{fingerprint(location(output_dir))[:8]}"


def usable(handle: Handle) -> str | None:
    """None when the handle's folder is there and matches its manifest, else what is wrong."""
    return verify(handle.path)


# -- what each key was made of -------------------------------------------------------------------

def _records(output_dir: str | Path, stage: str) -> Path:
    return Path(output_dir).expanduser() / ".store" / stage


def _record_path(output_dir: str | Path, stage: str, key: str) -> Path:
    return _records(output_dir, stage) / f"{key}.json"


def _made_by() -> dict[str, Any]:
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return {"flow_run": flow_run.name, "flow_run_id": flow_run.id, "flow": flow_run.flow_name}
    except Exception:  # noqa: BLE001 - outside Prefect: say which process
        pass
    return {"pid": os.getpid()}


def read_records(output_dir: str | Path, stage: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(_records(output_dir, stage).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def _used_now(path: Path, new: dict[str, Any] | None = None) -> None:
    """Set the record's `last_used` to now, whole or not at all (concurrent runs); a missing record is
    created from `new`, or left missing when there is none."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        if new is None:
            return
        record = new
    record["last_used"] = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")  # unique per writer (threads too)
    write_json(tmp, record)
    os.replace(tmp, path)


def remember(output_dir: str | Path, sk: StageKey) -> None:
    """Record that `sk`'s folder was made (or used) now; keeps the first creation time and maker."""
    _used_now(_record_path(output_dir, sk.stage, sk.key),
              {"stage": sk.stage, "key": sk.key, "parts": sk.parts, "created": time.time(), "made_by": _made_by()})


def will_build(output_dir: str | Path, stage: str, key: str, refresh: bool) -> bool:
    """Whether `build` computes the stage of `key`: a refresh is asked for, or its folder is not complete."""
    return refresh or not is_complete(folder(output_dir, stage, key))


def build(output_dir: str | Path, sk: StageKey, refresh: bool, run: Callable[[Path], dict[str, Any]],
          info_file: str = INFO) -> Handle:
    """The one hit/miss protocol of a stage's folder, and the stage's handle: a complete folder for `sk` is reused
    and marked as used, unless `refresh`; else `run(folder)` builds the stage into a temporary folder and returns
    its summary, which is written to `info_file`; the folder is renamed into place with its manifest
    (`artifacts.atomic_dir`: a crash leaves nothing half-written) and `sk` is recorded. The stage never sees its
    key or the final folder."""
    final = folder(output_dir, sk.stage, sk.key)
    if not will_build(output_dir, sk.stage, sk.key, refresh):
        logging.getLogger("loraflow").info("%s: reusing %s", sk.stage, final)
        touch(output_dir, sk.stage, sk.key)
    else:
        report = final.with_name(f"{final.name}.rejected.json")
        try:
            with atomic_dir(final, {"stage": sk.stage, "key": sk.key}) as tmp:
                write_json(tmp / info_file, run(tmp))
        except Rejected as err:
            write_json(report, err.report)
            err.args = (f"{err.args[0]} (report: {report})",)
            raise
        finally:
            return_freed_memory()  # the stage's temporaries (a model's full-precision weights): not kept resident
        report.unlink(missing_ok=True)
        remember(output_dir, sk)
    return Handle(stage=sk.stage, path=str(final), fingerprint=sk.key, info=json.loads((final / info_file).read_text()))


def touch(output_dir: str | Path, stage: str, key: str) -> None:
    """Mark a cached folder as used now (a hit)."""
    _used_now(_record_path(output_dir, stage, key))


def forget(output_dir: str | Path, stage: str, key: str) -> None:
    """Drop what is remembered about a key (`loraflow cache gc` removed its folder)."""
    _record_path(output_dir, stage, key).unlink(missing_ok=True)


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    old, new = flatten(before), flatten(now)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def nearest(output_dir: str | Path, sk: StageKey) -> tuple[dict[str, Any], list[str]] | None:
    """The earlier key of this stage that differs from `sk` in the fewest fields, and those fields."""
    best = None
    for record in read_records(output_dir, sk.stage):
        if record.get("key") == sk.key:
            continue
        changed = differences(record.get("parts", {}), sk.parts)
        if best is None or (len(changed), -record.get("last_used", 0)) < (len(best[1]), -best[0].get("last_used", 0)):
            best = (record, changed)
    return best


def explain(output_dir: str | Path, sk: StageKey) -> str:
    """Why `sk` has no usable folder: which fields differ from the nearest earlier key."""
    if _record_path(output_dir, sk.stage, sk.key).is_file():
        return f"key {sk.key} was made before, but its folder is gone or damaged"
    if sk.stage == "train" and any((work_dir(output_dir, sk.key) / "checkpoints").glob("checkpoint-*")):
        return "an interrupted run of this key left checkpoints: resuming from the last one"
    found = nearest(output_dir, sk)
    if found is None:
        return "no earlier run in this output folder"
    record, changed = found
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"{shown} changed (nearest earlier key {record['key']})"


# -- who reads a folder now --------------------------------------------------------------------------

READER_GRACE_SECONDS = 86400.0  # a reader on another machine (its liveness unknown here) counts for a day


def _readers(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser() / ".store" / "readers"


_READING = threading.local()


@contextmanager
def reading_run(output_dir: str | Path) -> Iterator[None]:
    """A run's stay: the folders it uses (`reading`) are recorded in `.store/readers/<run>.json` with its process's
    identity until it ends, so `loraflow cache gc` does not delete them under it. A killed run's record names a
    process that is gone, and counts for nothing."""
    path = _readers(output_dir) / f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.json"
    outer = getattr(_READING, "path", None)
    _READING.path = path
    try:
        yield
    finally:
        _READING.path = outer
        path.unlink(missing_ok=True)


def reading(handle: Handle) -> None:
    """Inside `reading_run`: this run uses `handle`'s folder."""
    path = getattr(_READING, "path", None)
    if path is None:
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {**identity(), "stages": []}
    if [handle.stage, handle.fingerprint] not in record["stages"]:
        record["stages"].append([handle.stage, handle.fingerprint])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    write_json(tmp, record)
    os.replace(tmp, path)


def live_readers(output_dir: str | Path) -> dict[tuple[str, str], str]:
    """{(stage, key): who} for the folders live runs use; records of runs that are gone are removed."""
    found: dict[tuple[str, str], str] = {}
    for path in _readers(output_dir).glob("*.json"):
        try:
            record, age = json.loads(path.read_text()), time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            continue
        dead = gone(record)
        if dead or (dead is None and age > READER_GRACE_SECONDS):
            path.unlink(missing_ok=True)
            continue
        who = f"in use by a live run (pid {record.get('pid')} on {record.get('host')})"
        for stage, key in record.get("stages", []):
            found[(stage, key)] = who
    return found


# -- mirror: a URL output_dir ----------------------------------------------------------------------

def publish(handle: Handle, output_dir: str) -> Handle:
    """With a URL output_dir, upload the finished stage folder there (see `loraflow.store.remote`)."""
    if is_url(output_dir):
        upload(Path(handle.path), remote_folder(output_dir, handle.stage, handle.fingerprint))
    return handle


def localize(handle: Handle, cfg: PipelineConfig) -> tuple[Handle, str | None]:
    """A cached stage as this machine sees it, and what makes its folder unusable (None: checked, usable).
    With a URL output_dir the folder is this machine's mirror copy, downloaded from the URL when it is
    missing or damaged (another worker computed it); a model stage computed elsewhere gets this
    machine's copy of the base model (same content: its identity is in the key)."""
    if not is_url(cfg.run.output_dir):
        return handle, usable(handle)
    local = local_root(cfg.run.output_dir, cfg.run.cache_dir) / handle.stage / handle.fingerprint
    problem = verify(local)
    if problem is not None:  # `download` checks the copy against its manifest before putting it in place
        problem = download(remote_folder(cfg.run.output_dir, handle.stage, handle.fingerprint), local)
    update: dict[str, Any] = {"path": str(local)}
    if handle.stage == "model" and not Path(handle.info.get("base_dir", "")).is_dir():
        from loraflow.store.sources import resolve_model_dir

        m = cfg.model
        base_dir = resolve_model_dir(m.name_or_path, m.revision, cfg.run.cache_dir, m.allow_pickle_weights)
        update["info"] = {**handle.info, "base_dir": str(base_dir)}
    return handle.model_copy(update=update), problem
