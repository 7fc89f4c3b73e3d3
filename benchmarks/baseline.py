"""The plain fine-tuning script loraflow is measured against, written the way such scripts usually are.

    python benchmarks/baseline.py --train train.jsonl --test test.jsonl --model-dir DIR --out result.json

Prompt and target are tokenized together and padded to --max-length; the loss is on every token
(DataCollatorForLanguageModeling); `Trainer` trains the same NF4 + LoRA model with the same batch size,
steps and learning rate as loraflow; evaluation calls `generate` once per example. The only additions
are timers, peak-memory readings and ROUGE with loraflow's scorer, printed as one JSON object.
The prompt is rendered with the same chat template and instruction as loraflow's, so both see the
same text.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--train", "--test", "--model-dir", "--out", "--instruction"):
        p.add_argument(name, required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default="/tmp/baseline-out")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="matmul dtype (default: bf16 on a CUDA GPU, else fp32); the harness passes loraflow's choice")
    args = p.parse_args()

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments)

    from loraflow import rouge

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def prompt(row):
        content = args.instruction.format(**row)
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    def tokenize(rows):  # target: a list of references; train on the first
        examples = [{k: rows[k][i] for k in rows} for i in range(len(rows["target"]))]
        texts = [prompt(r) + r["target"][0] + tokenizer.eos_token for r in examples]
        return tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                         add_special_tokens=False)

    train = datasets.load_dataset("json", data_files=args.train, split="train")
    test = [json.loads(line) for line in open(args.test)]
    t0 = time.perf_counter()
    train_tok = train.map(tokenize, batched=True, remove_columns=train.column_names, keep_in_memory=True)
    tokenize_s = time.perf_counter() - t0

    dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, quantization_config=quant,
        device_map={"": 0} if torch.cuda.is_available() else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks["begin"] = time.time()

        def on_step_end(self, a, state, control, **kw):
            marks.setdefault("first_step_at", time.time())
            marks["end"] = time.time()

    cuda = torch.cuda.is_available()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
            optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda and torch.cuda.is_bf16_supported(),
            logging_steps=4, save_strategy="no", report_to="none", seed=args.seed),
        train_dataset=train_tok,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[Timer()],
    )
    trainer.train()
    loop_s = marks["end"] - marks["begin"]
    train_peak = peak_rss_mb()
    train_gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    model.eval()
    model.config.use_cache = True  # Trainer leaves it False (TrainingArguments.use_cache); decode with the KV cache
    predictions = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in test:
            enc = tokenizer(prompt(row), return_tensors="pt", add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
            predictions.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    eval_s = time.perf_counter() - t0
    scores = rouge.score(predictions, [r["target"] for r in test])
    result = {
        "tokenize_examples_per_second": round(len(train) / tokenize_s, 1),
        "first_step_at": marks["first_step_at"],
        "train_examples_per_second": round(args.steps * args.batch_size / loop_s, 4),
        "train_loop_s": round(loop_s, 2),
        "positions_seen": args.steps * args.batch_size * args.max_length,
        "label_positions_seen": args.steps * args.batch_size * args.max_length,
        "attention_square_sum": args.steps * args.batch_size * args.max_length ** 2,
        "train_peak_rss_mb": train_peak,
        "train_peak_gpu_mb": None if train_gpu_peak is None else round(train_gpu_peak, 1),
        "eval_examples_per_second": round(len(test) / eval_s, 4),
        "eval_s": round(eval_s, 2),
        "rouge": scores,
        "peak_rss_mb": peak_rss_mb(),
        "predictions": predictions,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
