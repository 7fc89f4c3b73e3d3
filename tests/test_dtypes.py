"""Both compute dtypes on this CPU, whatever it is: bf16 tracks fp32, training works in each, and an
in-training evaluation leaves the gradients alone (bitsandbytes' eval-only CPU kernel must not leak)."""

from __future__ import annotations

import pytest
import torch

from loraflow.config import build_config
from tests_support import build_model, prepare_data, tokenize_data, train_adapter, write_examples
from loraflow.stages.model import load_for_training

DTYPES = ("float32", "bfloat16")


def toy_config(root, tiny_llama_dir, dtype: str, **train):
    return build_config({
        "data": {"source": str(write_examples(root / "toy.jsonl")), "input_column": "text", "target_column": "summary",
                 "test_size": 0.125},
        "prompt": {"style": "template", "template": "Text: {input}\nSummary:", "max_length": 64, "max_target_length": 16},
        "model": {"name_or_path": str(tiny_llama_dir)},
        "quantization": {"mode": "nf4", "compute_dtype": dtype},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 4,
                  "save_steps": 100, "lr_scheduler_type": "constant", "report_to": [], **train},
    })


@pytest.fixture(scope="module")
def prepared(tiny_llama_dir, tmp_path_factory):
    """Data, tokens and the model stage for each dtype (the model stage's key holds the dtype)."""
    root = tmp_path_factory.mktemp("dtypes")
    out = {}
    for dtype in DTYPES:
        cfg = toy_config(root, tiny_llama_dir, dtype)
        data = prepare_data(cfg.data, root / "shared")
        tokenized = tokenize_data(data, cfg.prompt, tiny_llama_dir, root / "shared")
        out[dtype] = (cfg, tokenized, build_model(cfg.model, cfg.quantization, cfg.lora, root / "shared"))
    assert out["float32"][2].fingerprint != out["bfloat16"][2].fingerprint
    assert out["bfloat16"][2].info["compute_dtype"] == "bfloat16"
    return root, out


def batch(tokenized, n: int = 8) -> dict[str, torch.Tensor]:
    import datasets

    from loraflow.stages.train.collators import CompletionCollator

    rows = datasets.load_from_disk(f"{tokenized.path}/dataset")["train"].select(range(n))
    return CompletionCollator(pad_token_id=0)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])


def trainable_model(stage, upcast_frozen="auto"):
    """The train stage's model with a trained-looking adapter (the initial B = 0 gives A no gradient)."""
    cfg, _, model_handle = stage
    model = load_for_training(model_handle, cfg.model, cfg.quantization, gradient_checkpointing=False,
                              upcast_frozen=upcast_frozen)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def loss_and_grads(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_loss_and_gradients_track_fp32(prepared):
    _, stages = prepared
    got = {}
    for dtype in DTYPES:
        got[dtype] = loss_and_grads(trainable_model(stages[dtype]), batch(stages[dtype][1]))
    (loss32, grads32), (loss16, grads16) = got["float32"], got["bfloat16"]
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    # bf16 keeps 8 bits of mantissa: the gradient of every LoRA tensor points the same way as fp32's
    for name, g in grads32.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads16[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


def test_bf16_frozen_weights_kept_in_bf16_track_the_fp32_upcast(prepared):
    # peft's prepare_model_for_kbit_training casts embeddings, norms and the LM head to fp32 (and with them
    # the activations); in bf16, 'auto' keeps them in bf16: less memory, the same direction of descent.
    _, stages = prepared
    stage = stages["bfloat16"]
    frozen = lambda m: {p.dtype for n, p in m.named_parameters() if "norm" in n or "embed" in n}  # noqa: E731
    kept, upcast = trainable_model(stage), trainable_model(stage, upcast_frozen=True)
    assert frozen(kept) == {torch.bfloat16} and frozen(upcast) == {torch.float32}
    (loss_kept, grads_kept), (loss_up, grads_up) = (loss_and_grads(m, batch(stage[1])) for m in (kept, upcast))
    assert loss_kept == pytest.approx(loss_up, rel=2e-2)
    for name, g in grads_up.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads_kept[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_after_an_eval_pass_equal_gradients_without_one(prepared, dtype):
    # On an AVX512-BF16 CPU, bitsandbytes repacked 4-bit weights for an inference-only kernel in eval
    # mode and kept using it after train(): the gradients through the frozen weights were then wrong.
    _, stages = prepared
    model, inputs = trainable_model(stages[dtype]), batch(stages[dtype][1])
    loss_before, before = loss_and_grads(model, inputs)
    model.eval()
    with torch.no_grad():  # what Trainer's evaluation does between training steps
        model(**inputs)
    loss_after, after = loss_and_grads(model, inputs)
    assert loss_after == loss_before
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_with_in_training_evaluation_matches_training_without_it(prepared, dtype):
    from safetensors.torch import load_file

    root, stages = prepared
    cfg, tokenized, model_handle = stages[dtype]
    plain = train_adapter(cfg, tokenized, model_handle, root / f"plain-{dtype}")
    evaluated_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_steps": 3})})
    evaluated = train_adapter(evaluated_cfg, tokenized, model_handle, root / f"eval-{dtype}")
    assert plain.info["compute_dtype"] == evaluated.info["compute_dtype"] == dtype
    assert plain.info["last_logged_loss"] < 0.8 * plain.info["first_logged_loss"], plain.info
    a = load_file(f"{plain.path}/adapter/adapter_model.safetensors")
    b = load_file(f"{evaluated.path}/adapter/adapter_model.safetensors")
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, msg=name)


def test_a_bf16_training_step_runs_the_lora_path_in_bf16_and_leaves_peft_as_it_was(prepared, tmp_path):
    """`train.bf16` (auto: on with a bf16 compute dtype, on a CPU too) is autocast over the whole step: the LoRA
    layers see bf16 input in the forward and in the checkpointed layers' recomputation during the backward (peft's
    cast to the fp32 LoRA weights off for the step), the weights and their gradients stay fp32, the loss is the fp32
    path's to bf16 rounding, and after the step peft casts again, so generation outside autocast works."""
    from loraflow.hardware import resolve
    from loraflow.stages.model import enable_checkpointing
    from loraflow.stages.train.collators import CompletionCollator
    from loraflow.stages.train.stage import training_arguments
    from loraflow.stages.train.trainer import CompletionTrainer

    _, stages = prepared
    stage = stages["bfloat16"]
    cfg = resolve(stage[0])
    assert cfg.train.bf16 is True
    inputs = batch(stage[1])
    reference, _ = loss_and_grads(trainable_model(stage), inputs)  # no autocast: the LoRA path in fp32
    model = trainable_model(stage)
    enable_checkpointing(model)
    seen: list[torch.dtype] = []
    lora_a = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    for module in lora_a:
        module.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    trainer = CompletionTrainer(model=model, args=training_arguments(cfg.train, tmp_path, has_eval=False),
                                data_collator=CompletionCollator(pad_token_id=0))
    model.train()
    loss = trainer.training_step(model, dict(inputs))
    assert len(seen) == 2 * len(lora_a)  # the forward, and the recomputation in the backward
    assert set(seen) == {torch.bfloat16}, seen
    assert float(loss) == pytest.approx(reference, rel=2e-2)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads)
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    model.eval()
    model.generate(input_ids=inputs["input_ids"][:1, :8], max_new_tokens=2, do_sample=False)
