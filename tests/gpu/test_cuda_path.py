"""The CUDA path of the library stages on the tiny Llama: NF4 on the GPU with a device map, training in the
worker process (bf16 autocast through the label-only loss, paged 8-bit AdamW, gradient checkpointing), 4-bit
generation with the adapter switched off for the base, a single-rank NCCL group, peak GPU memory against the
pre-flight estimate. No Prefect: the stages' plain functions, as the tasks call them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraflow.config import build_config
from tests_support import build_model, prepare_data, run_train_worker, tokenize_data, write_examples
from loraflow.stages.model import load_base, load_for_training

pytestmark = pytest.mark.gpu
STEPS = 40
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only under LORAFLOW_GPU_TESTS_ON_CPU (conftest)


@pytest.fixture(scope="module")
def stages(tiny_llama_dir, tmp_path_factory):
    """data -> tokenize -> model -> train (the worker process) -> evaluate, on the GPU."""
    from tests_support import evaluate_adapter

    root = tmp_path_factory.mktemp("gpu")
    cfg = build_config({
        "data": {"source": str(write_examples(root / "toy.jsonl")), "input_column": "text", "target_column": "summary",
                 "test_size": 0.125},
        "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(tiny_llama_dir)},
        "quantization": {"mode": "nf4"},  # compute dtype auto: bf16 on a GPU that has it
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 4,
                  "save_steps": 1000, "lr_scheduler_type": "constant", "gradient_checkpointing": True,
                  "report_to": []},
        "eval": {"max_new_tokens": 8, "batch_size": 16, "bootstrap_samples": 200},
        "run": {"output_dir": str(root / "runs")},
    })
    out = root / "runs"
    data = prepare_data(cfg.data, out)
    tokenized = tokenize_data(data, cfg.prompt, tiny_llama_dir, out)
    model = build_model(cfg.model, cfg.quantization, cfg.lora, out)
    trained = run_train_worker(cfg, tokenized, model, out)
    evaluated = evaluate_adapter(cfg, tokenized, model, trained, out)
    return {"cfg": cfg, "tokenized": tokenized, "model": model, "trained": trained, "evaluated": evaluated}


def lora_batch(stages, n: int = 8) -> dict[str, torch.Tensor]:
    import datasets

    from loraflow.stages.train.collators import CompletionCollator

    rows = datasets.load_from_disk(f"{stages['tokenized'].path}/dataset")["train"].select(range(n))
    batch = CompletionCollator(pad_token_id=0)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return {k: v.to(DEVICE) for k, v in batch.items()}


def trainable(stages, checkpointing: bool):
    """The train stage's model with a non-zero B (the initial B = 0 gives A no gradient)."""
    cfg = stages["cfg"]
    model = load_for_training(stages["model"], cfg.model, cfg.quantization, checkpointing, cfg.train.upcast_frozen)
    model.train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=torch.Generator(device=p.device).manual_seed(1))
    return model


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], min_cosine: float) -> list[str]:
    """Names whose gradients point differently (cosine below `min_cosine`) or differ in norm by over 5%."""
    bad = []
    for name in a:
        x, y = a[name].flatten(), b[name].flatten()
        cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
        if cos < min_cosine or abs(float(x.norm() / y.norm()) - 1) > 0.05:
            bad.append(f"{name}: cosine {cos:.4f}")
    return bad


def test_the_base_is_4bit_nf4_on_the_gpu_the_device_map_names(stages, monkeypatch):
    from bitsandbytes.nn import Linear4bit

    cfg = stages["cfg"]
    assert stages["model"].info["device"] == "cuda" and stages["model"].info["compute_dtype"] == "bfloat16"
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun sets it: rank i loads onto GPU i
    base = load_base(stages["model"].info["base_dir"], cfg.model, cfg.quantization)
    assert base.hf_device_map == {"": 0}
    layers = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for m in layers:
        assert type(m.weight).__name__ == "Params4bit" and m.weight.device == torch.device("cuda", 0)
        assert m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4"
    assert base.get_input_embeddings().weight.device.type == "cuda"


def test_training_in_the_worker_takes_the_cuda_path_and_learns(stages):
    m = stages["trained"].info
    assert m["device"].startswith("cuda") and m["compute_dtype"] == "bfloat16" and m["bf16"] is True
    assert m["optim"] == "paged_adamw_8bit"  # train.optim auto on CUDA
    assert m["gradient_checkpointing"] is True and m["label_only_logits"] is True
    assert m["global_step"] == STEPS and m["base_weights_unchanged"] is True
    assert m["last_logged_loss"] < 0.7 * m["first_logged_loss"], m
    assert m["peak_gpu_mb"] and m["peak_gpu_mb"] > 0


def test_every_lora_weight_moved_through_the_checkpointed_layers(stages):
    from safetensors.torch import load_file

    init = load_file(Path(stages["model"].path) / "adapter_init" / "adapter_model.safetensors")
    trained = load_file(Path(stages["trained"].path) / "adapter" / "adapter_model.safetensors")
    assert init.keys() == trained.keys() and any(".layers.0." in k for k in init)
    unchanged = [k for k in init if torch.equal(init[k], trained[k])]
    assert not unchanged  # lora_A and lora_B of every layer, layer 0 included


def test_checkpointing_keeps_the_gradients_under_bf16_autocast(stages):
    batch = lora_batch(stages)
    got = {}
    for checkpointing in (True, False):
        model = trainable(stages, checkpointing)
        assert model.get_base_model().model.layers[0].gradient_checkpointing is checkpointing
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        got[checkpointing] = grads(model)
    assert not close(got[True], got[False], 0.999)


def test_label_only_loss_under_bf16_autocast_matches_the_models_own(stages):
    from loraflow.stages.train.trainer import body_and_head, label_only_loss

    batch = lora_batch(stages)
    model = trainable(stages, checkpointing=False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        full = model(**batch, use_cache=False).loss
    full.backward()
    want = grads(model)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, n_labels = label_only_loss(*body_and_head(model), batch)
    loss.backward()
    assert int(n_labels) == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(float(loss) - float(full)) < 1e-2 * float(full)
    assert not close(grads(model), want, 0.99)


def test_peak_gpu_memory_is_inside_the_preflight_estimate(stages):
    from loraflow.stages.train.stage import longest_batch_estimate

    m = stages["trained"].info
    need = longest_batch_estimate(stages["cfg"], stages["model"].info["base_dir"],
                                  Path(stages["tokenized"].path) / "stats.json", checkpointing=True)  # as trained
    parts = need.parts
    measured = m["peak_gpu_mb"] * 2**20  # max_memory_allocated: the CUDA context (the estimate's runtime) is not in it
    print(f"peak GPU memory {measured / 2**20:.0f} MiB; estimate {sum(parts.values()) / 2**20:.0f} MiB "
          f"({ {k: round(v / 2**20) for k, v in parts.items()} })")
    assert measured <= sum(parts.values())  # the estimate is what pre-flight refuses by: it must not be short
    assert measured >= 0.1 * (sum(parts.values()) - parts["runtime"])  # nor off by an order of magnitude


def test_4bit_generation_scores_the_tuned_model_above_the_base(stages):
    metrics = stages["evaluated"].info
    assert metrics["dequantized"] is False  # eval.dequantize auto: 4-bit on a GPU
    tuned, base = metrics["finetuned"]["rougeL_fmeasure"], metrics["base"]["rougeL_fmeasure"]
    assert tuned > base + 0.2, (tuned, base)


def test_disable_adapter_in_4bit_generates_what_the_base_alone_generates(stages):
    import datasets
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraflow.stages.generation import generate

    cfg = stages["cfg"]
    adapter = Path(stages["trained"].path) / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    prompts = datasets.load_from_disk(f"{stages['tokenized'].path}/dataset")["test"]["prompt_ids"]
    base_dir = stages["model"].info["base_dir"]
    alone = generate(load_base(base_dir, cfg.model, cfg.quantization).eval(), tokenizer, prompts, cfg.eval, "base")
    model = PeftModel.from_pretrained(load_base(base_dir, cfg.model, cfg.quantization), adapter).eval()
    tuned = generate(model, tokenizer, prompts, cfg.eval, "tuned")
    with model.disable_adapter():
        switched_off = generate(model, tokenizer, prompts, cfg.eval, "adapter off")
    assert switched_off == alone
    assert tuned != alone


NCCL_SCRIPT = """
import json, os, torch, torch.distributed as dist
from loraflow.stages.train.distributed import gather_from_ranks, sum_over_ranks
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
out = {"backend": dist.get_backend(), "world": dist.get_world_size(),
       "sum": sum_over_ranks({"label_tokens_seen": 7, "examples_seen": 3}, torch.device("cuda")),
       "gathered": gather_from_ranks(12.5)}
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
"""


def test_a_single_rank_nccl_group_sums_and_gathers(tmp_path):
    script = tmp_path / "nccl_rank.py"
    script.write_text(NCCL_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"backend": "nccl", "world": 1, "sum": {"label_tokens_seen": 7, "examples_seen": 3},
                      "gathered": [12.5]}
