"""What the side scripts (baseline.py, trl_peer.py) share: their common arguments and the stop ids.

They run as plain scripts (`python benchmarks/baseline.py ...`), so this module is imported as their
sibling (`from script_args import ...`).
"""

from __future__ import annotations

import argparse


def common_parser(output_dir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    for name in ("--train", "--test", "--model-dir", "--out", "--instruction"):
        p.add_argument(name, required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="default",
                   help="the side's own default, or forced on / off (the like-for-like memory rows)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (TrainingArguments' bf16); default: on a CUDA GPU with bf16 only. The harness "
                   "passes loraflow's choice (`train.bf16: auto`), as it passes the compute dtype")
    return p


def mixed_precision(choice: bool | None) -> bool:
    """TrainingArguments' `bf16` for `--bf16`: as given, else on a CUDA GPU with bf16."""
    import torch

    if choice is not None:
        return choice
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def checkpointing_args(choice: str) -> dict:
    """TrainingArguments' checkpointing for `choice`: nothing for the side's own default, else forced on
    (non-reentrant, as a competent user sets it) or off."""
    if choice == "default":
        return {}
    on = choice == "on"
    return {"gradient_checkpointing": on, **({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if on else {})}


def stop_ids(model_dir: str, tokenizer) -> list[int]:
    """The model's own stop ids (its generation config) and the tokenizer's EOS: a chat model stops at end of turn."""
    from transformers import GenerationConfig

    configured = GenerationConfig.from_pretrained(model_dir).eos_token_id
    listed = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted({*listed, tokenizer.eos_token_id})


def step_timer(marks: dict[str, float]):
    """A TrainerCallback writing into `marks`: "begin" (training starts), "first_step_at" and "end" (the
    first and the last optimizer step's end), as time.time()."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            marks.setdefault("first_step_at", time.time())
            marks["end"] = time.time()

    return StepTimer()
