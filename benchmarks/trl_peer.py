"""The peer loraflow is measured against: TRL's `SFTTrainer`, used the way its documentation shows.

    python benchmarks/trl_peer.py --train train.jsonl --test test.jsonl --model-dir DIR --out result.json

Prompt-completion data in conversational form (the user turn, then the target as the assistant's answer),
so SFTTrainer applies the chat template and computes the loss on the completion only (its default for
such data); its default batching (pad to the longest in the batch). Packing and padding-free batches are
left off: TRL supports padding-free only with FlashAttention 2/3 (none on CPU), and packing without it lets
packed examples attend to each other. The same NF4 + LoRA model, batch size, steps, learning rate and
schedule as the other sides; `--seed` sets the data order and the LoRA initialisation. Evaluation as TRL users write it: batched `generate` (left padding), stopping
on the model's end-of-turn / EOS ids. Timers and ROUGE as in `benchmarks/baseline.py`.
"""

from __future__ import annotations

import json
import resource
import time


from script_args import checkpointing_args, common_parser, mixed_precision, step_timer, stop_ids  # noqa: E402 - a sibling: this runs as a script


def main() -> None:
    p = common_parser("/tmp/trl-out")
    p.add_argument("--eval-batch-size", type=int, default=12)
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from loraflow.metrics import rouge

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    def user(row):
        return [{"role": "user", "content": args.instruction.format(**row)}]

    raw = datasets.load_dataset("json", data_files=args.train, split="train")
    train = raw.map(lambda r: {"prompt": user(r), "completion": [{"role": "assistant", "content": r["target"][0]}]},
                    remove_columns=raw.column_names)
    test = [json.loads(line) for line in open(args.test)]

    dtype = getattr(torch, args.compute_dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, quantization_config=quant,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    marks: dict[str, float] = {}
    counted = {"positions_seen": 0, "label_positions_seen": 0, "attention_square_sum": 0}

    class Counting(SFTTrainer):  # instrumentation only: the work each step's batch does
        def training_step(self, model, inputs, *rest, **kw):
            rows, length = inputs["input_ids"].shape
            counted["positions_seen"] += rows * length
            counted["label_positions_seen"] += rows * length  # logits at every position
            counted["attention_square_sum"] += rows * length**2
            return super().training_step(model, inputs, *rest, **kw)

    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=args.output_dir, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps, optim="paged_adamw_8bit" if cuda else "adamw_torch",
        bf16=mixed_precision(args.bf16), use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
        seed=args.seed, **checkpointing_args(args.gradient_checkpointing))  # SFTConfig's default: on
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # SFTTrainer builds the LoRA model before Trainer seeds anything: seed its init here
    trainer = Counting(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                       peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                              task_type="CAUSAL_LM"),
                       callbacks=[step_timer(marks)])
    prepare_s = time.perf_counter() - t0
    result = trainer.train()
    loop_s = marks["end"] - marks["begin"]
    train_peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    model = trainer.model
    model.eval()
    model.config.use_cache = True
    stops = stop_ids(args.model_dir, tokenizer)
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(user(r), tokenize=False, add_generation_prompt=True) for r in test]
    predictions, stopped = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.eval_batch_size):
            enc = tokenizer(prompts[i:i + args.eval_batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                ended = next((j for j, t in enumerate(row) if t in stops), None)
                stopped.append(ended is not None)
                predictions.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
    eval_s = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out = {
        "prepare_dataset_s": round(prepare_s, 2),
        "first_step_at": marks["first_step_at"],
        "loop_began_at": marks["begin"],
        "train_examples_per_second": round(args.steps * args.batch_size / loop_s, 4),
        "train_loop_s": round(loop_s, 2),
        "train_loss": result.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "losses": losses,  # per step
        "seed": args.seed,
        **counted,
        "train_peak_rss_mb": train_peak,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "eval_examples_per_second": round(len(test) / eval_s, 4),
        "eval_s": round(eval_s, 2),
        "stop_rate": round(sum(stopped) / len(stopped), 4),
        "mean_prediction_words": round(sum(len(p.split()) for p in predictions) / len(predictions), 2),
        "rouge": rouge.score(predictions, [r["target"] for r in test]),
        "predictions": predictions,
        "trl": __import__("trl").__version__,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
