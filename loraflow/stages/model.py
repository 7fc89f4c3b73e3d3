"""The **model** stage: base model in 4-bit (bitsandbytes NF4/FP4) with LoRA adapters (peft).

`load_base` and `attach_lora` are shared with train and evaluate, which reload the model from
the handles (a model never travels between Prefect tasks). The stage itself saves the freshly
initialised adapter, so training starts from a known, seeded point and tests can compare against it.
When the train stage will run in a process started with the run, the stage is built there (`build`, through
`loraflow.stages.launch.build_model`) and training goes on with the model as built: loaded once.
A base is quantized once per machine: `load_base` keeps its 4-bit weights in the cache (`quantized_copy`), and
later loads (this stage, training, evaluate, export) read them.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from loraflow.store.artifacts import Handle, atomic_dir, complete_in_process, default_cache_dir, fingerprint
from loraflow.store.buildlock import MODEL_BUILD, making
from loraflow.config import LoraConfig, ModelConfig, QuantizationConfig
from loraflow.hardware import resolve_compute_dtype
from loraflow.store.sources import resolve_model_dir, weights_digest

log = logging.getLogger("loraflow")
INFO = "model.json"  # the stage's summary, the Handle's info (`store.build` writes what `run` returns)


class ModelError(ValueError):
    """A model/LoRA setting that cannot work; the message names the fix."""


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(name: str):
    """The torch dtype of matmuls; 'auto' is resolved by `loraflow.hardware` (bf16 where it is native)."""
    import torch

    return getattr(torch, resolve_compute_dtype(name))


def set_cpu_4bit_kernel(model, allowed: bool) -> None:
    """Allow or forbid bitsandbytes' packed bf16 CPU kernel for this model's 4-bit layers.

    On a CPU with AVX512-BF16, a `Linear4bit` in eval mode repacks its weight for an inference-only bf16
    kernel (`gemv_4bit`) and never unpacks it when it goes back to `train()`: after an in-training
    evaluation every later forward used a kernel without a backward, so the gradients reaching earlier
    layers through the frozen weights were silently wrong. It also computes in bf16 whatever
    `compute_dtype` says. So: forbidden for training and for fp32 compute, allowed for bf16 inference.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = allowed and module.support_avx512bf16_for_cpu


def check_bitsandbytes(mode: str) -> None:
    """4-bit loading needs a working bitsandbytes build for this machine."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a missing native library for this platform
        raise ModelError(
            f"quantization.mode={mode} needs bitsandbytes, which cannot run here ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120] if str(err) else 'not installed'}): install it or set quantization.mode=none"
        ) from None


def quantized_copy(model_dir: str | Path, model: ModelConfig, quant: QuantizationConfig,
                   cache_dir: str | None) -> Path | None:
    """Where the 4-bit copy of the base in `model_dir` is kept for these settings (`load_base`): one per source
    content, 4-bit setting, compute dtype (the weights kept unquantized are in it) and bitsandbytes / transformers
    versions. None where none is kept: no quantization, or a model whose own code (`trust_remote_code`) would not
    be beside the copy."""
    if quant.mode == "none" or model.trust_remote_code:
        return None
    from importlib.metadata import version

    key = fingerprint(_identity(Path(model_dir)), quant.mode, quant.double_quant,
                      resolve_compute_dtype(quant.compute_dtype), version("bitsandbytes"), version("transformers"))
    return default_cache_dir(cache_dir) / "models" / "4bit" / f"{Path(model_dir).name}-{quant.mode}-{key}"


def _identity(model_dir: Path) -> str:
    """What the base's weights are: a Hugging Face cache snapshot is named by its repository and commit (its files are
    never hashed); any other folder by the digest of its weight, config and tokenizer files (the model key's own)."""
    folder = model_dir.expanduser().resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return f"{folder.parent.parent.name}@{folder.name}"
    return weights_digest(folder)


def _keep(base, copy: Path, model_dir: str | Path) -> None:
    """Save the just-quantized `base` as the 4-bit copy (whole or not at all); a failure costs the next load a
    quantization, never this run."""
    try:
        with atomic_dir(copy, {"source": str(model_dir)}) as tmp:
            base.save_pretrained(tmp)
    except Exception as err:  # noqa: BLE001 - a full or read-only cache, or a model bitsandbytes cannot save
        why = str(err).splitlines()[0][:200] if str(err) else ""
        log.warning("model: the 4-bit copy of %s was not kept in %s (%s: %s): the next load quantizes it again",
                    Path(model_dir).name, copy.parent, type(err).__name__, why)


def load_base(model_dir: str | Path, model: ModelConfig, quant: QuantizationConfig, training: bool = False,
              cache_dir: str | None = None):
    """Load the frozen base model, quantized to 4 bits unless quant.mode == 'none' (see
    `set_cpu_4bit_kernel` for what `training` changes). The first 4-bit load of a base quantizes it and keeps the
    result in the cache (`quantized_copy`, checked against its checksums before each use); later loads read that
    copy, which is what quantizing gives, bit for bit, without the quantization (most of the load on a CPU) or
    the full-precision weights in memory."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(quant.compute_dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": model.trust_remote_code,
        "use_safetensors": None if model.allow_pickle_weights else True,
    }
    if model.attn_implementation != "auto":
        kwargs["attn_implementation"] = model.attn_implementation
    if quant.mode != "none":
        check_bitsandbytes(quant.mode)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.mode,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if torch.cuda.is_available():
        # One device per process: under DDP every rank holds its own 4-bit copy.
        from loraflow.hardware import local_rank

        index = local_rank()  # under torchrun, rank i on GPU i; else the current device
        kwargs["device_map"] = {"": torch.cuda.current_device() if index is None else index}
    copy = quantized_copy(model_dir, model, quant, cache_dir)
    with making(copy) if copy is not None else nullcontext():  # one thread makes it, the others wait and read it
        reuse = copy is not None and complete_in_process(copy)
        if reuse:  # its config.json holds the quantization config it was made with
            kwargs.pop("quantization_config")
        with MODEL_BUILD:
            base = AutoModelForCausalLM.from_pretrained(str(copy if reuse else model_dir), **kwargs)
        if copy is not None and not reuse:
            _keep(base, copy, model_dir)
    for p in base.parameters():
        p.requires_grad_(False)
    set_cpu_4bit_kernel(base, allowed=not training and dtype == torch.bfloat16)
    return base


def peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def attach_lora(base, lora: LoraConfig):
    """Wrap the base with fresh LoRA adapters (seeded), checking the target modules exist. The base is used as
    it is (training upcasts its frozen weights first where `upcasts` says so; the adapter is fp32 either way)."""
    import torch
    from peft import get_peft_model

    if lora.target_modules != "all-linear":
        names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
        missing = [t for t in lora.target_modules if t not in names]
        if missing:
            raise ModelError(
                f"lora.target_modules {missing} not found in the model: choose from {sorted(names - {'lm_head'})} "
                "or use 'all-linear'"
            )
    with MODEL_BUILD:
        torch.manual_seed(lora.seed)
        return get_peft_model(base, peft_config(lora))


def parameter_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def run(model: ModelConfig, quant: QuantizationConfig, lora: LoraConfig, out: Path, cache_dir: str | None = None) -> dict[str, Any]:
    """Resolve the base model, load it quantized with LoRA, save the initial adapter to `out/adapter_init`;
    returns the sizes (`model.json`, the Handle's info). `quant` is resolved (`hardware.resolve`)."""
    return build(model, quant, lora, out, cache_dir)[1]


def build(model: ModelConfig, quant: QuantizationConfig, lora: LoraConfig, out: Path, cache_dir: str | None = None,
          training: bool = False) -> tuple[Any, dict[str, Any]]:
    """`run`, returning the model as well: (the peft model, the summary). `training`: loaded as training loads it
    (`load_base`), so the training process that built the stage trains this very model."""
    model_dir = resolve_model_dir(model.name_or_path, model.revision, cache_dir, model.allow_pickle_weights)
    base = load_base(model_dir, model, quant, training=training, cache_dir=cache_dir)
    footprint = base.get_memory_footprint()  # the frozen base alone
    peft_model = attach_lora(base, lora)
    info = {
        "base_dir": str(model_dir),
        "device": device_type(),
        "quantization": quant.mode,
        "compute_dtype": quant.compute_dtype,
        "memory_footprint_mb": round(footprint / 2**20, 1),
        **parameter_counts(peft_model),
    }
    info["trainable_percent"] = round(100 * info["trainable_params"] / info["total_params"], 3)
    peft_model.save_pretrained(out / "adapter_init")
    log.info(
        "model: %s, %s, %d trainable of %d params (%.2f%%), %.1f MiB",
        model_dir.name, quant.mode, info["trainable_params"], info["total_params"],
        info["trainable_percent"], info["memory_footprint_mb"],
    )
    return peft_model, info


def upcasts(upcast_frozen: bool | str, compute_dtype_name: str) -> bool:
    """Whether training casts the frozen non-4-bit weights to fp32 (train.upcast_frozen: 'auto' = in fp16)."""
    return resolve_compute_dtype(compute_dtype_name) == "float16" if upcast_frozen == "auto" else bool(upcast_frozen)


def load_for_training(model_handle: Handle, model: ModelConfig, quant: QuantizationConfig, gradient_checkpointing: bool,
                      upcast_frozen: bool | str = "auto", cache_dir: str | None = None):
    """Base (quantized) + the model stage's initial adapter, trainable. With `upcasts`, the frozen weights
    that are not 4-bit go to fp32 (peft's prepare_model_for_kbit_training); else they stay in the compute dtype."""
    from peft import PeftModel

    base = load_base(model_handle.info["base_dir"], model, quant, training=True, cache_dir=cache_dir)
    base = prepare_for_training(base, quant, gradient_checkpointing, upcast_frozen)
    with MODEL_BUILD:
        return PeftModel.from_pretrained(base, Path(model_handle.path) / "adapter_init", is_trainable=True)


def ready_for_training(built, quant: QuantizationConfig, gradient_checkpointing: bool, upcast_frozen: bool | str):
    """The model `build(training=True)` returned, made what `load_for_training` would load; None where it cannot
    be: frozen weights to upcast (`upcasts`) must be upcast before LoRA wraps them."""
    if quant.mode != "none" and upcasts(upcast_frozen, quant.compute_dtype):
        return None
    if gradient_checkpointing:
        enable_checkpointing(built.get_base_model())
    return built


def prepare_for_training(base, quant: QuantizationConfig, gradient_checkpointing: bool, upcast_frozen: bool | str):
    """The frozen base made ready for LoRA training (see `load_for_training`)."""
    from peft import prepare_model_for_kbit_training

    if quant.mode != "none" and upcasts(upcast_frozen, quant.compute_dtype):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_checkpointing(base)
    return base


# Non-reentrant: autograd sees through the recomputed layers, so the LoRA weights inside them get their gradients
# whether or not the layer's input requires grad. (peft's prepare_model_for_kbit_training would pass `{}`, which
# leaves torch to pick: reentrant, with a warning.)
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def enable_checkpointing(model, **extra) -> None:
    """Turn activation checkpointing on: here, once. Training passes `activation_checkpointing=False` to
    TrainingArguments (`loraflow.stages.train.stage`), because Trainer would otherwise enable it a second time, with its own
    arguments, over the same layers; peft's prepare_model_for_kbit_training is asked not to either. `extra`: more
    arguments for torch's `checkpoint` beside `CHECKPOINTING_KWARGS` (benchmarks.levers' selective row)."""
    kwargs = {**CHECKPOINTING_KWARGS, **extra}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: the old name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
