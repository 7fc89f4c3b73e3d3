"""The plain fine-tuning script loraflow is measured against.

    python benchmarks/baseline.py --train train.jsonl --test test.jsonl --model-dir DIR --out result.json [--variant naive]

`--variant fair` (the default, the headline row) is the script a competent user writes today: the
conversation (prompt, then the target as the assistant's answer) rendered with the chat template, the
loss on the answer and its end-of-turn token only (the prompt's labels are -100, set before padding, so
the end-of-turn is labelled even though SmolLM2's pad token is that same token), right padding to the
longest example of each batch (`DataCollatorForSeq2Seq`), and `generate` once per example, stopping on
the model's end-of-turn / EOS ids.

`--variant naive` is the script as it is often written and kept only as a second, named row: prompt +
target + EOS padded to --max-length with the loss on every token (`DataCollatorForLanguageModeling`).
That collator sets the label of every pad-id token to -100, so with pad == eos the appended EOS is never
learned and generation runs to max_new_tokens.

Both train the same NF4 + LoRA model with the same batch size, steps and learning rate as loraflow; `--seed` sets
the data order (Trainer's sampler) and the LoRA initialisation (`torch.manual_seed` before `get_peft_model`). The
only additions are timers, peak-memory readings and ROUGE with loraflow's scorer, printed as one JSON
object. The prompt is rendered with the same chat template and instruction as loraflow's.
"""

from __future__ import annotations

import json
import resource
import time


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


from script_args import checkpointing_args, common_parser, mixed_precision, step_timer, stop_ids  # noqa: E402 - a sibling: this runs as a script


def main() -> None:
    p = common_parser("/tmp/baseline-out")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--variant", choices=["fair", "naive"], default="fair")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="matmul dtype (default: bf16 on a CUDA GPU, else fp32); the harness passes loraflow's choice")
    args = p.parse_args()

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              DataCollatorForSeq2Seq, Trainer, TrainingArguments)

    from loraflow.metrics import rouge

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def prompt(row):
        content = args.instruction.format(**row)
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    def naive(rows):  # target: a list of references; train on the first
        examples = [{k: rows[k][i] for k in rows} for i in range(len(rows["target"]))]
        texts = [prompt(r) + r["target"][0] + tokenizer.eos_token for r in examples]
        return tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                         add_special_tokens=False)

    def fair(row):  # the answer and its end of turn carry the loss; the prompt does not
        user = [{"role": "user", "content": args.instruction.format(**row)}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["target"][0]}],
                                             tokenize=False)
        prompt_ids = tokenizer(prompt(row), add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:args.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids):]}

    train = datasets.load_dataset("json", data_files=args.train, split="train")
    test = [json.loads(line) for line in open(args.test)]
    t0 = time.perf_counter()
    if args.variant == "fair":
        tokenizer.padding_side = "right"
        train_tok = train.map(fair, remove_columns=train.column_names, keep_in_memory=True)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    else:
        train_tok = train.map(naive, batched=True, remove_columns=train.column_names, keep_in_memory=True)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    tokenize_s = time.perf_counter() - t0
    lengths = [len(x) for x in train_tok["input_ids"]]
    counted = {"positions_seen": 0, "label_positions_seen": 0, "attention_square_sum": 0}

    class Counting(Trainer):  # instrumentation only: the work each step's batch does (LM head at every position)
        def training_step(self, model, inputs, *rest, **kw):
            rows, length = inputs["input_ids"].shape
            counted["positions_seen"] += rows * length
            counted["label_positions_seen"] += rows * length
            counted["attention_square_sum"] += rows * length**2
            return super().training_step(model, inputs, *rest, **kw)

    dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, quantization_config=quant,
        device_map={"": 0} if torch.cuda.is_available() else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(args.seed)  # the LoRA init: paired by seed with the other sides (Trainer seeds only its own work)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    marks: dict[str, float] = {}

    cuda = torch.cuda.is_available()
    trainer = Counting(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
            optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=mixed_precision(args.bf16),
            use_cpu=not cuda,  # what transformers asks for before it allows bf16 without a GPU
            logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
            **checkpointing_args(args.gradient_checkpointing)),  # TrainingArguments' default: off
        train_dataset=train_tok,
        data_collator=collator,
        callbacks=[step_timer(marks)],
    )
    trained = trainer.train()
    loop_s = marks["end"] - marks["begin"]
    train_peak = peak_rss_mb()
    train_gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    model.eval()
    model.config.use_cache = True  # Trainer leaves it False (TrainingArguments.use_cache); decode with the KV cache
    # the model's own stop ids (its generation config) and the tokenizer's EOS: a chat model stops at end of turn
    stops = stop_ids(args.model_dir, tokenizer)
    predictions, stopped = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in test:
            enc = tokenizer(prompt(row), return_tensors="pt", add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            stopped.append(bool(new) and new[-1] in stops and len(new) <= args.max_new_tokens)
            predictions.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    eval_s = time.perf_counter() - t0
    scores = rouge.score(predictions, [r["target"] for r in test])
    result = {
        "tokenize_examples_per_second": round(len(train) / tokenize_s, 1),
        "first_step_at": marks["first_step_at"],
        "loop_began_at": marks["begin"],
        "train_examples_per_second": round(args.steps * args.batch_size / loop_s, 4),
        "train_loop_s": round(loop_s, 2),
        **counted,
        "train_loss": trained.training_loss,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],  # per step
        "seed": args.seed,
        "variant": args.variant,
        "stop_rate": round(sum(stopped) / len(stopped), 4),
        "mean_prediction_words": round(sum(len(p.split()) for p in predictions) / len(predictions), 2),
        "mean_train_tokens": round(sum(lengths) / len(lengths), 1),
        "train_peak_rss_mb": train_peak,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
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
