"""The stage chain both flows run: data -> tokenize -> model -> train -> evaluate (-> export), each a cached task."""

from __future__ import annotations

import gc
import importlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect.logging import get_run_logger

from loraflow import store
from loraflow.config import DataConfig, PipelineConfig, build_config, check_run_overrides, deep_merge, default_config, over_defaults
from loraflow.hardware import resolve, why_dtype
from loraflow.ops import tracking
from loraflow.stages.launch import early_start, start_model_build
from loraflow.store.artifacts import Handle, ensure_writable
from loraflow.store.remote import check_writable, is_url
from tasks.stages import (data_task, evaluate_task, export_task, for_run, model_task, preflight_task, tokenize_task,
                          train_task, workspace)
from tasks.slots import wait_for_slots
from tasks.storage import result_storage_slug


@dataclass
class Stages:
    data: Handle
    tokenized: Handle
    model: Handle
    trained: Handle
    scores: Handle
    storage: str | None  # the result-storage block slug the stages used (None: Prefect's default)
    exported: Handle | None = None  # the export stage, when it ran (`export_stage`)

    def all(self) -> tuple[Handle, ...]:
        return (self.data, self.tokenized, self.model, self.trained, self.scores) + ((self.exported,) if self.exported else ())


def resolve_config(cfg: PipelineConfig) -> PipelineConfig:
    """Inside a deployment run, `cfg` is read field by field over the deployment's config, itself over
    the built-in default (see `over_defaults`): `--param cfg='{"train": {"max_steps": 5}}'` changes
    one field. The output folder is checked and made absolute, and the machine-dependent 'auto'
    settings resolved (`loraflow.hardware.resolve`), before any stage runs."""
    from prefect.runtime import deployment

    if deployment.id:
        own, scheduled = _deployment_cfg(deployment.id)
        base = deep_merge(default_config().model_dump(mode="json"), own)
        overrides = cfg.model_dump(mode="json", exclude_unset=True)
        if overrides and overrides not in scheduled:  # a schedule's parameters are the deployment's own
            check_run_overrides(overrides, build_config(base))
        cfg = over_defaults(cfg, base)
    if is_url(cfg.run.output_dir):  # fail before any stage, not after training
        check_writable(cfg.run.output_dir)
    else:
        output_dir = ensure_writable(cfg.run.output_dir)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(output_dir)})})
    get_run_logger().info("%s", why_dtype(cfg.quantization.compute_dtype))
    return resolve(cfg)


def _deployment_cfg(deployment_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `cfg` the deployment itself was created with (prefect.runtime's `deployment.parameters`
    is the flow run's, already replaced by the caller's partial value), and the `cfg`s its schedules pass."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_deployment(deployment_id)
    scheduled = [(s.parameters or {}).get("cfg") for s in (found.schedules or [])]
    return (found.parameters or {}).get("cfg") or {}, [c for c in scheduled if c]


def stage(task_obj, cfg: PipelineConfig, storage: str | None, *args: Any) -> Handle:
    """Run one cached stage. A cache hit whose artifact folder is gone or fails its checksums is
    never used: it is logged and the stage recomputes (`run.refresh` forces that for all or some stages)."""
    logger = get_run_logger()
    refresh = cfg.run.refreshes(task_obj.name)
    task_obj = for_run(task_obj, cfg.run, storage)
    if task_obj.tags:  # e.g. `gpu`: a slot a dead run still holds is released first, and a wait says what for
        limited = wait_for_slots(sorted(task_obj.tags), task_obj.name, logger)
        if set(limited) != set(task_obj.tags):  # a tag no limit names only costs a slot request (`wait_for_slots`)
            task_obj = task_obj.with_options(tags=set(limited))
    state = task_obj.with_options(refresh_cache=refresh or None)(*args, return_state=True)
    handle: Handle = state.result()
    tracker = tracking.current()  # MLflow's run lists the stages that were cache hits
    if state.name == "Cached":
        handle, problem = store.localize(handle, cfg)
        if problem is None:
            logger.info("%s: hit — key %s, cached %s", handle.stage, handle.fingerprint, handle.path)
            store.touch(workspace(cfg.run), handle.stage, handle.fingerprint)
            if tracker is not None:
                tracker.note(task_obj.name, cached=True)
            store.reading(handle)
            return handle
        logger.warning("%s: cached result unusable (%s): recomputing", handle.stage, problem)
        handle = task_obj.with_options(refresh_cache=True)(*args)
    if tracker is not None:
        tracker.note(task_obj.name, cached=False)
    store.reading(handle)  # `loraflow cache gc` keeps what a live run uses
    return handle


def load_hub_token(secret_name: str | None) -> None:
    """Expose a token from a Prefect Secret block as HF_TOKEN for this run (and the training child)."""
    if not secret_name:
        return
    from prefect.blocks.system import Secret

    try:
        os.environ["HF_TOKEN"] = Secret.load(secret_name).get()
    except ValueError:
        raise ValueError(
            f"run.hf_token_secret: no Prefect Secret block named '{secret_name}': create it in the UI "
            "(Blocks > Secret) or unset the field to use HF_TOKEN"
        ) from None


def run_stages(cfg: PipelineConfig) -> Stages:
    """The stages of `cfg`, each handed its key: every key is computed here, once (`store.chain`)."""
    load_hub_token(cfg.run.hf_token_secret)
    storage = result_storage_slug(cfg.run.result_storage) if cfg.run.result_storage else None
    try:
        keys = store.chain(cfg)
    except Exception as err:  # noqa: BLE001 - an input that cannot be read: the pre-flight checks say which, and how
        keys, unreadable = None, err
    preflight = store.preflight_key(cfg, keys["evaluate"].key) if keys else None
    # A train that will run starts its process now: its imports overlap the flow's start, and the stages before
    # training that need torch run in it (pre-flight, tokenize, model), so this process imports torch only after
    # training. It writes nothing before the pre-flight passes, and a failed pre-flight ends it. `early`: its train
    # key, or None (no process, or another run of this config in this process started it and asks it).
    data_ahead = cfg.data if keys and store.will_build(workspace(cfg.run), "data", keys["data"].key,
                                                       cfg.run.refreshes("data")) else None
    with early_start(cfg, workspace(cfg.run), keys["train"].key if keys else None) as early, \
            _ready_beside(early, data_ahead) as beside:  # errors fail the run here:
        preflight_task.with_options(result_storage=storage)(cfg, preflight, early, beside.data_folder)
        if keys is None:
            raise unreadable
        start_model_build(cfg, workspace(cfg.run), early, keys["model"].key)  # loads while data, tokenize run
        data = stage(data_task, cfg, storage, cfg.data, cfg.run, keys["data"])
        tokenized = stage(tokenize_task, cfg, storage, data, cfg.prompt, cfg.model, cfg.run, keys["tokenize"], early)
        model = stage(model_task, cfg, storage, cfg.model, cfg.quantization, cfg.lora, cfg.run, keys["model"], early)
        trained = stage(train_task, cfg, storage, cfg, tokenized, model, keys["train"], early)
    scores = stage(evaluate_task, cfg, storage, cfg, tokenized, model, trained, keys["evaluate"])
    return Stages(data, tokenized, model, trained, scores, storage)


@dataclass
class Beside:
    """What `_ready_beside` does while the flow waits: its thread (None: nothing to do), and the folder it builds
    the data stage's splits in, for the pre-flight to read (None: not built ahead)."""
    thread: threading.Thread | None = None
    data_folder: str | None = None


@contextmanager
def _ready_beside(early: str | None, data: DataConfig | None = None,
                  modules: tuple[str, ...] = ("datasets",)) -> Iterator[Beside]:
    """While the training process started early (`early`: its train key) imports torch and runs the pre-flight, this
    process only waits, on a core of its own. A thread uses that core:
    - it imports `modules` (what the data stage imports: `datasets`, 0.5 s on a 2-core CPU), then collects and
      freezes what is alive (`gc.freeze`), so that the full collection after each stage before training
      (`store.build`'s `return_freed_memory`: 0.07-0.1 s each over Prefect's, pydantic's and datasets' objects, on
      the way to the first step) skips them; not where something else froze objects already;
    - given the config of a data stage that will run (`data`), it builds its splits (`data.build_ahead`: local
      sources only, in a private folder, nothing written to the workspace). The pre-flight reads them when they
      are ready before it needs them, and the data stage saves them instead of building them again.
    When training is over, it unfreezes (a process that runs many flows, a test session or a served deployment,
    keeps no run's objects out of the collector) and drops splits no stage took. Nothing to do without an early
    training process."""
    if early is None:
        yield Beside()
        return
    freeze = not gc.get_freeze_count()
    frozen = threading.Event()
    from loraflow.stages import data as data_stage

    folder = data_stage.reserve_ahead(data) if data is not None else None

    def prepare() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported by the stage that needs it
                break
        if freeze:
            gc.collect()  # what is garbage now is not frozen
            gc.freeze()
            frozen.set()
        if folder is not None:
            data_stage.build_ahead(data)

    thread = threading.Thread(target=prepare, name="loraflow-ready-beside", daemon=True)
    thread.start()
    try:
        yield Beside(thread, str(folder) if folder else None)
    finally:
        thread.join(timeout=60)
        if frozen.is_set():
            gc.unfreeze()
        if folder is not None:
            data_stage.drop_ahead(data)


def export_stage(cfg: PipelineConfig, stages: Stages) -> Handle:
    """The cached export stage after evaluate (merged / GGUF, parity-checked); kept on `stages`."""
    stages.exported = stage(export_task, cfg, stages.storage, cfg, stages.tokenized, stages.model, stages.trained,
                            stages.scores, store.export_key(cfg, stages.scores.fingerprint))
    return stages.exported
