"""The **train** stage: `transformers.Trainer` on the tokenized data, saving a LoRA adapter.

Device is picked by Trainer (CUDA when visible, else CPU); mixed precision is bf16 or nothing
(fp16 is never used). Checkpoints go to a work folder keyed like the stage, so a rerun of the same
config resumes from the last checkpoint; the finished folder is renamed into place atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from loraflow import store
from loraflow.store.artifacts import Handle, atomic_dir, is_complete, write_json
from loraflow.config import SET_BY_LORAFLOW, PipelineConfig, TrainConfig
from loraflow.hardware import return_freed_memory
from loraflow.stages.train.distributed import ddp_backend, gather_from_ranks, rank, sum_over_ranks

log = logging.getLogger("loraflow")
MODEL_COLUMNS = ["input_ids", "labels"]


class Preempted(RuntimeError):
    """Training stopped early on request (SIGTERM) after saving a checkpoint; a rerun resumes."""


def resolve_optim(train: TrainConfig, cuda: bool) -> str:
    """'auto' = paged 8-bit AdamW on CUDA (bitsandbytes), plain AdamW on CPU."""
    if train.optim == "auto":
        return "paged_adamw_8bit" if cuda else "adamw_torch"
    return train.optim


def resolve_bf16(train: TrainConfig) -> bool:
    """bf16 autocast: `train.bf16` as `hardware.resolve` leaves it ('auto' here only for a config not resolved,
    with the compute dtype's 'auto' rule)."""
    from loraflow.hardware import resolve_mixed_precision

    return resolve_mixed_precision(train.bf16, "auto")


def training_arguments(train: TrainConfig, checkpoint_dir: Path, has_eval: bool):
    """Map our TrainConfig onto transformers.TrainingArguments (extra_args pass through unchanged)."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    eval_on = has_eval and train.eval_steps is not None
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        # Checkpointing, when on, is already on the model (`stages.model.enable_checkpointing`): Trainer must not
        # enable it a second time.
        activation_checkpointing=False,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps,
        max_grad_norm=train.max_grad_norm,
        optim=resolve_optim(train, cuda),
        bf16=resolve_bf16(train),
        fp16=False,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=train.eval_steps if eval_on else None,
        prediction_loss_only=True,  # eval loss only: never accumulate (batch, seq, vocab) logits
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # Every choice reads the validation split (the eval set): never the test split it is reported on.
        load_best_model_at_end=bool(train.load_best_model_at_end or train.early_stopping_patience) and eval_on,
        metric_for_best_model=train.metric_for_best_model if eval_on else None,
        greater_is_better=train.metric_for_best_model != "eval_loss" if eval_on else None,
        report_to="none",  # TensorBoard is attached explicitly, with our log dir
        seed=train.seed,
        data_seed=train.seed,
        dataloader_num_workers=train.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if train.batching == "length_grouped" else "random",
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # LoRA: every trainable weight gets a gradient at every step
        ddp_backend=ddp_backend(train.ddp_backend, cuda),
        use_cpu=not cuda,  # also what makes accelerate run several CPU processes as DDP (gloo)
        use_cache=False,  # no KV cache while training; generation turns it back on
    )
    if not kwargs.keys() <= SET_BY_LORAFLOW:  # the list extra_args is checked against must name what is set here
        raise RuntimeError(f"SET_BY_LORAFLOW misses {sorted(kwargs.keys() - SET_BY_LORAFLOW)}; this is a bug, please report it")
    kwargs.update(train.extra_args)
    return TrainingArguments(**kwargs)


def make_collator(train: TrainConfig, pad_token_id: int):
    """Packed rows (transformers' `DataCollatorWithFlattening`: positions restart per example, its first label
    masked), else each batch padded to its longest example, rounded up to `train.pad_to_multiple_of`
    (`CompletionCollator`)."""
    if train.batching == "packed":
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening()
    from loraflow.stages.train.collators import CompletionCollator

    return CompletionCollator(pad_token_id=pad_token_id, pad_to_multiple_of=train.pad_to_multiple_of)


def peak_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process, and peak CUDA memory allocated (None without a GPU)."""
    import resource

    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def frozen_checksum(model) -> list[float]:
    """Per-tensor sums of the frozen (base) weights, computed on their device: any update changes them."""
    import torch

    with torch.no_grad():
        return [float(p.detach().float().sum()) for p in model.parameters() if not p.requires_grad]


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest *complete* checkpoint. Trainer writes trainer_state.json last, so a folder without
    it was cut off mid-save (a kill during saving) and must not be resumed from."""
    if not checkpoint_dir.is_dir():
        return None
    found = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for ckpt in found:
        if (ckpt / "trainer_state.json").is_file():
            return str(ckpt)
        log.warning("train: skipping incomplete checkpoint %s (no trainer_state.json)", ckpt.name)
    return None


def resumable_checkpoint(checkpoint_dir: Path, max_steps: int) -> str | None:
    """The checkpoint to resume from: the last complete one, unless it is at the run's last step (`max_steps` > 0;
    the run finished but was not committed, e.g. a full disk at commit), where Trainer would train one step past
    the end: then the one before it (its steps replayed from the saved random state), or none."""
    resume = last_checkpoint(checkpoint_dir)
    if resume is None or max_steps <= 0:
        return resume
    state = json.loads((Path(resume) / "trainer_state.json").read_text())
    if state["global_step"] < max_steps:
        return resume
    earlier = [p for p in Path(checkpoint_dir).glob("checkpoint-*")
               if p.name.split("-")[-1].isdigit() and int(p.name.split("-")[-1]) < state["global_step"]
               and (p / "trainer_state.json").is_file()]
    return str(max(earlier, key=lambda p: int(p.name.split("-")[-1]))) if earlier else None


def validation_rouge(cfg: PipelineConfig, validation, tokenizer) -> Callable[[Any], float]:
    """ROUGE-L F1 of greedy generation on the first `train.eval_generate_samples` validation rows, for
    `eval_rougeL` at each eval step (CompletionTrainer)."""
    rows = validation.select(range(min(cfg.train.eval_generate_samples or 0, len(validation))))
    prompts, references = rows["prompt_ids"], rows["references"]

    def score(model) -> float:
        from loraflow.metrics import rouge
        from loraflow.stages.generation import generate

        predictions = generate(model, tokenizer, prompts, cfg.eval, "eval generate", stop_ids(cfg, tokenizer, model))
        return rouge.score(predictions, references, use_stemmer=cfg.eval.use_stemmer)["rougeL_fmeasure"]

    return score


def stop_ids(cfg: PipelineConfig, tokenizer, model) -> list[int]:
    from loraflow.stages.prompts import stop_token_ids

    return stop_token_ids(tokenizer, cfg.prompt, getattr(model, "generation_config", None))


def stopping_generation_config(model, tokenizer, cfg: PipelineConfig):
    """The model's generation config, made to stop on every end-of-turn id (saved with the adapter)."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = stop_ids(cfg, tokenizer, model)
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _shorter(info: dict[str, Any], train: TrainConfig) -> bool:
    """Whether a finished run (its train_metrics) is a shorter run of this one: fewer steps when this run
    counts steps, fewer epochs when both count epochs."""
    length = info.get("length") or {}
    if train.max_steps > 0:
        return (info.get("global_step") or 0) < train.max_steps
    return length.get("max_steps", 0) <= 0 and length.get("num_train_epochs", float("inf")) < train.num_train_epochs


def seed_continuation(cfg: PipelineConfig, output_dir: str | Path, key: store.StageKey) -> Path | None:
    """Continue, not restart, when only the run's length grew (`max_steps`, or `num_train_epochs` when both
    runs count epochs): copy the final checkpoint of the longest shorter finished run with the same
    continuation key into this run's work folder, so training resumes from its last step (weights,
    optimizer, scheduler, RNG, data position). Returns the copied checkpoint.

    The schedule is this run's: Trainer rebuilds it for the new total and resumes at the step reached.
    `constant` / `constant_with_warmup` then continue exactly as an uninterrupted run would; a decaying
    schedule (`cosine`, `linear`) jumps from the shorter run's final learning rate to the longer
    schedule's value at that step (it is not a new warm-up). `key`: the run's train key (`store.chain`); the
    continuation key is derived from it (`store.continuation`)."""
    work = store.work_dir(output_dir, key.key)
    if last_checkpoint(work / "checkpoints") is not None:
        return None
    wanted, best = store.continuation(key), None
    for metrics_file in store.folder(output_dir, "train", key.key).parent.glob("*/train_metrics.json"):
        try:
            info = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            continue
        step = info.get("global_step") or 0
        ckpt = metrics_file.parent / "checkpoints" / f"checkpoint-{step}"
        if (info.get("continuation_key") == wanted and _shorter(info, cfg.train) and is_complete(metrics_file.parent)
                and (ckpt / "trainer_state.json").is_file() and (best is None or step > best[0])):
            best = (step, ckpt)
    if best is None:
        return None
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = work / "checkpoints" / best[1].name
    shutil.copytree(best[1], target)
    log.info("train: continuing from %s (step %d of the shorter run)", best[1], best[0])
    return target


class NonFiniteTraining(ValueError):
    """The loss or the adapter is NaN or infinite (e.g. fp16 overflow): nothing is published."""


def non_finite(losses: list[float | None], model) -> str | None:
    """What is not finite: a logged loss, or a trainable (adapter) weight; None when all are."""
    import math

    bad = [x for x in losses if x is not None and not math.isfinite(x)]
    if bad:
        return f"the training loss is {bad[0]}"
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(p.detach().isfinite().all()):
            return f"the adapter weight {name} is not finite"
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def train_adapter(
    cfg: PipelineConfig,
    tokenized: Handle,
    model_handle: Handle,
    output_dir: str | Path,
    key: store.StageKey,
    callbacks: list | None = None,
    stop_requested: Callable[[], bool] | None = None,
    process: dict[str, Any] | None = None,
    built: Any = None,
) -> Handle | None:
    """Fine-tune the LoRA adapter into `<output_dir>/train/<key>`; returns a handle to the folder holding adapter/,
    logs/ and metrics (None on the other ranks of a multi-process run). `key`: the run's train key (`store.chain`,
    handed to the training process in its request); `cfg` is resolved (`hardware.resolve`). `process` is recorded
    in the metrics as it is (how the training process was started). `built`: the model as the model stage built
    it in this process (`stages.model.build`, in the training process started with the run), trained as it is
    instead of loading the base and the initial adapter again.

    Training has its own folder protocol, not `store.build`'s: it checkpoints into `<key>.work` (kept across a
    crash, to resume from) and writes the stage folder at the end. `stop_requested` (checked after training) turns
    an early stop into `Preempted`, leaving the checkpoint in the work folder for the rerun instead of publishing
    a half-trained adapter.
    """
    done = finished_train(cfg, output_dir, key.key)
    if done is not None:
        return done
    final = store.folder(output_dir, "train", key.key)
    work = store.work_dir(output_dir, key.key)  # survives crashes: holds the checkpoints to resume from
    _run_training(cfg, tokenized, model_handle, final, work, callbacks or [], stop_requested, process or {},
                  store.continuation(key), built)
    if rank() != 0:
        return None  # under DDP, rank 0 writes the stage folder and returns the handle
    store.remember(output_dir, key)
    metrics = json.loads((final / "train_metrics.json").read_text())
    return Handle(stage="train", path=str(final), fingerprint=key.key, info=metrics)


def resolve_checkpointing(cfg: PipelineConfig, base_dir: str, stats_file: Path, cuda: bool | None = None) -> bool:
    """train.gradient_checkpointing, with 'auto' as `memory.checkpointing` decides it: on on a CPU; on a GPU (`cuda`,
    default: this process's device), on when the memory estimate for the longest batch (from the tokenize stage's
    stats) exceeds what is free now. The reason is logged."""
    value = cfg.train.gradient_checkpointing
    if value != "auto":
        return bool(value)
    from loraflow.stages import memory

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    estimated: list = []  # the estimate, where `memory.checkpointing` reads one (on a GPU)

    def without():
        estimated.append(longest_batch_estimate(cfg, base_dir, stats_file, checkpointing=False, cuda=cuda))
        return estimated[-1]

    on = memory.checkpointing(value, cuda, without)
    log.info("train: gradient checkpointing %s (auto): %s", "on" if on else "off",
             estimated[-1].line("estimate without it") if estimated else "on a CPU")
    return on


def longest_batch_estimate(cfg: PipelineConfig, base_dir: str, stats_file: Path, checkpointing: bool,
                           cuda: bool | None = None):
    """`loraflow.stages.memory`'s training estimate for the longest batch the tokenize stage's stats allow, against what
    is free now on `cuda`'s device (default: this process's), as a `memory.Estimate`."""
    import torch
    from transformers import AutoConfig

    from loraflow.stages import memory

    stats = json.loads(stats_file.read_text())["train"]
    length = min(cfg.prompt.max_length, stats["max_prompt_tokens"] + stats["max_target_tokens"])
    cuda = torch.cuda.is_available() if cuda is None else cuda
    batch = cfg.train.per_device_train_batch_size
    shapes = memory.shapes(AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code))
    budget, where = memory.available(cuda)
    return memory.Estimate(memory.training(cfg, shapes, batch, length, batch * stats["max_target_tokens"], cuda,
                                           checkpointing), budget, where)


def finished_train(cfg: PipelineConfig, output_dir: str | Path, key: str) -> Handle | None:
    """The train stage's handle when its folder (train key `key`) is complete and no refresh is asked for (marked
    as used), else None: the one check both the training process and its launcher make."""
    if store.will_build(output_dir, "train", key, cfg.run.refreshes("train")):
        return None
    final = store.folder(output_dir, "train", key)
    if rank() == 0:
        store.touch(output_dir, "train", key)
    return Handle(stage="train", path=str(final), fingerprint=key,
                  info=json.loads((final / "train_metrics.json").read_text()))


def _run_training(cfg: PipelineConfig, tokenized: Handle, model_handle: Handle, final: Path, work: Path,
                  extra_callbacks: list, stop_requested: Callable[[], bool] | None, process: dict[str, Any],
                  continuation: str, built: Any = None) -> None:
    import datasets

    from loraflow.stages.model import device_type, load_for_training, ready_for_training
    from loraflow.stages.tokenize import take_tokenizer
    from loraflow.stages.train.trainer import CompletionTrainer

    data = datasets.load_from_disk(str(Path(tokenized.path) / "dataset"))
    train_ds = data["train"].select_columns(MODEL_COLUMNS)
    eval_ds = data["validation"].select_columns(MODEL_COLUMNS) if cfg.train.eval_steps else None
    tokenizer = take_tokenizer(model_handle.info["base_dir"])  # the one the pre-flight and tokenize stages used here

    checkpointing = resolve_checkpointing(cfg, model_handle.info["base_dir"], Path(tokenized.path) / "stats.json")
    model = None if built is None else ready_for_training(built, cfg.quantization, checkpointing,
                                                          cfg.train.upcast_frozen)
    process["model_built_here"] = model is not None  # loaded once (the model stage ran in this process)
    if model is None:
        model = load_for_training(model_handle, cfg.model, cfg.quantization, checkpointing, cfg.train.upcast_frozen,
                                  cfg.run.cache_dir)
    model.config.use_cache = False
    if device_type() == "cpu":  # where the model stage put the model
        from loraflow.stages.train.dropout import use_cpu_dropout

        use_cpu_dropout(model)  # the same dropout, from one 64-bit draw per four elements (see the module)
    process["model_ready_at"] = time.time()  # the cold run's timeline (benchmarks.report.timeline)
    before = frozen_checksum(model)

    args = training_arguments(cfg.train, work / "checkpoints", has_eval=eval_ds is not None)
    from loraflow.stages.train.callbacks import save_last_step, throughput

    timer = throughput()
    callbacks = [timer, save_last_step(), *extra_callbacks]
    if cfg.train.early_stopping_patience and eval_ds is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    if "tensorboard" in cfg.train.report_to:  # imported only then (~1 s before the first step otherwise)
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(work / "logs"))))
    trainer = CompletionTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=make_collator(cfg.train, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        label_only_logits=cfg.train.label_only_logits,
        rouge_eval=validation_rouge(cfg, data["validation"], tokenizer) if cfg.train.eval_generate_samples else None,
    )
    process["trainer_built_at"] = time.time()
    return_freed_memory()  # what loading the model freed (~0.45 GB) leaves RSS; the step's peak is not lower for it
    # (benchmarks/memory.py: the allocations of the first steps come back on top)
    resume = resumable_checkpoint(work / "checkpoints", args.max_steps)
    if resume:
        log.info("train: resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    if stop_requested and stop_requested():
        raise Preempted(f"stopped at step {trainer.state.global_step} with a checkpoint in {work / 'checkpoints'}")

    after = frozen_checksum(model)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    marks = timer.marks
    loop_s = marks.get("end", marks["begin"]) - marks["begin"]
    effective_batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    examples = (trainer.state.global_step - marks["begin_step"]) * effective_batch
    seen = sum_over_ranks({"label_tokens_seen": trainer.label_tokens_seen, "positions_seen": trainer.positions_seen,
                           "attention_square_sum": trainer.attention_square_sum,
                           "examples_seen": trainer.examples_seen}, args.device)
    # DDP keeps the ranks' adapters identical; a divergence would mean gradients were not all-reduced.
    adapter_sums = gather_from_ranks(sum(float(p.detach().float().sum()) for p in model.parameters() if p.requires_grad))
    metrics = {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "train_examples_per_second": round(examples / loop_s, 4) if loop_s > 0 else None,
        "target_tokens_per_second": round(seen["label_tokens_seen"] / loop_s, 2) if loop_s > 0 else None,
        "train_loop_s": round(loop_s, 3),
        **seen,  # summed over all processes
        "num_processes": args.world_size,
        "effective_batch_size": effective_batch,
        "adapter_sum_per_rank": adapter_sums,
        "written_by_rank": rank(),
        "first_step_at": marks.get("first_step_at"),  # time.time() of the first optimizer step's end
        "process": {**process, "loop_began_at": marks["begin"]},
        "batching": cfg.train.batching,
        "gradient_checkpointing": checkpointing,
        "optim": getattr(args.optim, "value", str(args.optim)),
        "bf16": args.bf16,
        "label_only_logits": trainer.parts is not None,
        **peak_memory_mb(),
        "base_weights_unchanged": before == after,
        "resumed_from": resume,
        "device": str(args.device),
        "compute_dtype": cfg.quantization.compute_dtype,
        "continuation_key": continuation,
        "length": {"max_steps": cfg.train.max_steps, "num_train_epochs": cfg.train.num_train_epochs},
    }
    if before != after:
        raise RuntimeError("train: base weights changed during LoRA training; this is a bug, please report it")
    if (problem := non_finite(losses + [result.training_loss], model)) is not None:
        raise NonFiniteTraining(
            f"train: {problem} at step {trainer.state.global_step}; nothing was published: lower train.learning_rate "
            "(or use bf16 rather than fp16), then rerun with --set 'run.refresh=[train]' to start over "
            f"(the checkpoints are kept in {work / 'checkpoints'})")
    if not trainer.is_world_process_zero():
        return  # rank 0 alone publishes the stage folder
    model.config.use_cache = True
    with atomic_dir(final, {"stage": "train"}) as tmp:
        model.save_pretrained(tmp / "adapter")  # adapter weights only, as safetensors
        tokenizer.save_pretrained(tmp / "adapter")  # with the chat template the prompts were rendered with
        stopping_generation_config(model, tokenizer, cfg).save_pretrained(tmp / "adapter")
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        write_json(tmp / "train_metrics.json", metrics)
        for sub in ("checkpoints", "logs"):
            if (work / sub).exists():  # hard links: if the commit fails (a full disk), the work folder is intact
                shutil.copytree(work / sub, tmp / sub, copy_function=_link_or_copy)
    shutil.rmtree(work, ignore_errors=True)
    log.info("train: %d steps, loss %s -> %s, adapter in %s", metrics["global_step"],
             metrics["first_logged_loss"], metrics["last_logged_loss"], final / "adapter")
