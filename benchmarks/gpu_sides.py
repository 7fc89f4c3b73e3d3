"""The GPU benchmark's models, data and sides (`benchmarks/gpu.py` measures them).

Models: randomly initialised from `SHAPES` (the public configs' shapes), saved once in bf16. Data: random ids with
the prompt and target lengths of `LENGTHS`. A side is a Trainer built the way its user would build it
(`side_trainer`), with a collator that counts each batch's work (`Counted`) and a step clock.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

# Public configs (the models' config.json): the shapes, nothing else, are taken.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True),
}
# (prompt tokens, target tokens + end of turn) of 64 SciTLDR train examples that fit 512 tokens, in SmolLM2's
# chat template with benchmarks/data.py's instruction (mean 233 + 27); measured 2026-12-01 with
# benchmarks.data._scitldr("train") shuffled by random.Random(0).
LENGTHS = [
    (306, 23), (143, 26), (216, 45), (353, 20), (205, 25), (237, 18), (192, 29), (257, 51), (284, 35), (144, 21),
    (221, 23), (241, 51), (172, 23), (270, 31), (161, 17), (237, 30), (191, 34), (139, 23), (311, 24), (209, 21),
    (257, 51), (211, 19), (207, 30), (167, 17), (232, 38), (214, 47), (232, 25), (281, 43), (208, 25), (241, 44),
    (231, 24), (162, 24), (207, 18), (264, 14), (226, 30), (264, 16), (274, 19), (350, 28), (228, 21), (218, 25),
    (179, 27), (300, 45), (227, 19), (231, 17), (222, 31), (133, 12), (243, 17), (253, 35), (334, 33), (173, 39),
    (242, 23), (206, 36), (404, 16), (246, 28), (262, 17), (186, 32), (236, 14), (333, 41), (193, 30), (211, 42),
    (253, 12), (240, 10), (263, 17), (183, 18),
]
PAD, EOS = 0, 2
SIDES = ["baseline", "trl", "loraflow", "logits everywhere", "liger fused linear CE", "packed", "random batches"]


def examples(n: int, vocab: int, seed: int, scale: float = 1.0) -> list[dict[str, list[int]]]:
    """`n` rows of random ids with LENGTHS' shapes (scaled for the dry run): labels -100 on the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, t = (max(2, int(x * scale)) for x in rng.choice(LENGTHS))
        ids = [rng.randrange(3, vocab) for _ in range(p + t - 1)] + [EOS]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * p + ids[p:]})
    return rows


def tokenizer_for(vocab: int):
    """A word-level tokenizer over the model's ids ("t<i>"): what collators, TRL and decoding need of one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<unk>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                  pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.padding_side = "right"
    assert len(tok) == vocab and tok.pad_token_id == PAD, "the special tokens must be the model's ids"
    return tok


def build(shape: str, out: Path, device: str) -> Path:
    """The randomly initialised model (seed 0) in bf16 with its tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer_for(config.vocab_size).save_pretrained(out)
    del model
    return out


class Counted:
    """A collator that records each batch's work: rows, padded length, examples (packed rows hold several), labels."""

    def __init__(self, collate: Callable) -> None:
        self.collate, self.batches = collate, []

    def __call__(self, rows):
        batch = self.collate(rows)
        r, length = batch["input_ids"].shape
        starts = batch.get("position_ids")
        segments = int((starts == 0).sum()) if starts is not None else r
        self.batches.append({"rows": r, "length": length, "examples": segments,
                             "labels": int((batch["labels"][:, 1:] != -100).sum())})
        return batch


def step_clock():
    """A TrainerCallback: time.perf_counter() at each optimizer step's end, after the GPU has finished it."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return Clock()


def train_args(out: Path, a: argparse.Namespace, cuda: bool):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.steps,
                             learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                             optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda, logging_steps=1,
                             save_strategy="no", report_to="none", seed=0, remove_unused_columns=False,
                             dataloader_pin_memory=cuda)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def _nf4(model_dir: Path, dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import torch

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant,
                                                device_map={"": 0} if torch.cuda.is_available() else None)


def side_trainer(side: str, model_dir: Path, rows: list[dict], out: Path, a: argparse.Namespace, clock, dtype):
    """(trainer, counting collator) for one side; the model is loaded fresh in NF4."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer

    cuda = torch.cuda.is_available()
    tokenizer = tokenizer_for(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    if side == "baseline":
        model = get_peft_model(prepare_model_for_kbit_training(_nf4(model_dir, dtype), use_gradient_checkpointing=False),
                               lora())
        counted = Counted(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True))
        return Trainer(model=model, args=train_args(out, a, cuda), train_dataset=rows, data_collator=counted,
                       callbacks=[clock]), counted
    if side == "trl":
        from trl import SFTConfig, SFTTrainer

        data = [{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows]
        import datasets

        config = SFTConfig(**{k: v for k, v in train_args(out, a, cuda).to_dict().items()
                              if k in ("output_dir", "per_device_train_batch_size", "max_steps", "learning_rate",
                                       "lr_scheduler_type", "warmup_steps", "optim", "bf16", "logging_steps",
                                       "save_strategy", "report_to", "seed")}, max_length=512,
                           completion_only_loss=True)  # pre-tokenized rows are not detected as prompt-completion
        trainer = SFTTrainer(model=_nf4(model_dir, dtype), args=config, train_dataset=datasets.Dataset.from_list(data),
                             processing_class=tokenizer, peft_config=lora(), callbacks=[clock])
        trainer.data_collator = counted = Counted(trainer.data_collator)
        return trainer, counted
    from loraflow.config import ModelConfig, QuantizationConfig, TrainConfig
    from loraflow.stages.model import load_base, peft_config, prepare_for_training
    from loraflow.stages.train.trainer import CompletionTrainer
    from loraflow.stages.train.stage import make_collator, training_arguments

    quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype=str(dtype).removeprefix("torch."))
    base = prepare_for_training(load_base(model_dir, ModelConfig(name_or_path=str(model_dir)), quant, training=True),
                                quant, gradient_checkpointing=False, upcast_frozen="auto")
    if side == "liger fused linear CE":
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base, rope=False, rms_norm=False, swiglu=False,
                                        fused_linear_cross_entropy=True)
    torch.manual_seed(0)
    from loraflow.config import LoraConfig

    model = get_peft_model(base, peft_config(LoraConfig(r=16, alpha=32, dropout=0.05)))
    batching = {"packed": "packed", "random batches": "random"}.get(side, "length_grouped")
    train = TrainConfig(per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=2e-4,
                        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=10**6,
                        report_to=[], seed=0, batching=batching)
    counted = Counted(make_collator(train, PAD))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]  # the train stage's columns
    label_only = side not in ("logits everywhere", "liger fused linear CE")
    return CompletionTrainer(model=model, args=training_arguments(train, out, has_eval=False), train_dataset=rows,
                             data_collator=counted, processing_class=tokenizer, callbacks=[clock],
                             label_only_logits=label_only), counted
