"""The model stage on the tiny Llama: 4-bit modes, LoRA targets, sizes reported; TrainingArguments mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.config import LoraConfig, ModelConfig, QuantizationConfig, TrainConfig
from loraflow.stages.model import ModelError, compute_dtype
from tests_support import build_model


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    model = ModelConfig(name_or_path=str(tiny_llama_dir))
    quant = {mode: QuantizationConfig(mode=mode, compute_dtype="float32") for mode in ("nf4", "fp4", "none")}
    return {mode: build_model(model, q, LoraConfig(r=4), out) for mode, q in quant.items()}


def test_every_quantization_mode_builds_and_reports_sizes(built):
    for mode, handle in built.items():
        info = json.loads((Path(handle.path) / "model.json").read_text())
        assert info["quantization"] == mode and info["device"] == "cpu"
        assert 0 < info["trainable_params"] < info["total_params"]
        assert (Path(handle.path) / "adapter_init" / "adapter_model.safetensors").is_file()
    # 4-bit linear weights: smaller than the fp32 model (the tied embedding stays full precision)
    assert built["nf4"].info["memory_footprint_mb"] < built["none"].info["memory_footprint_mb"]
    assert built["nf4"].info["trainable_params"] == built["none"].info["trainable_params"]
    assert len({h.fingerprint for h in built.values()}) == 3


def test_lora_seed_makes_the_initial_adapter_reproducible(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    model = ModelConfig(name_or_path=str(tiny_llama_dir))
    a = build_model(model, QuantizationConfig(mode="none"), LoraConfig(r=4, seed=1), tmp_path / "a")
    b = build_model(model, QuantizationConfig(mode="none"), LoraConfig(r=4, seed=1), tmp_path / "b")
    wa = load_file(Path(a.path) / "adapter_init" / "adapter_model.safetensors")
    wb = load_file(Path(b.path) / "adapter_init" / "adapter_model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_unknown_target_modules_list_the_candidates(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelError, match=r"lora.target_modules \['qkv'\] not found.*'q_proj'.*'v_proj'"):
        build_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig(mode="none"),
                    LoraConfig(target_modules=["q_proj", "qkv"]), tmp_path)
    assert not list(tmp_path.rglob("model.json"))


def test_cpu_defaults(monkeypatch):
    import torch

    from loraflow.stages.train.stage import training_arguments

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("LORAFLOW_CPU_FLAGS", "avx2 avx512f")  # a CPU without native bf16
    assert compute_dtype("auto") == torch.float32 and compute_dtype("bfloat16") == torch.bfloat16
    assert training_arguments(TrainConfig(), Path("/tmp/x"), has_eval=False).bf16 is False  # no bf16 autocast in fp32
    monkeypatch.setenv("LORAFLOW_CPU_FLAGS", "avx2 avx512f avx512_bf16")
    assert compute_dtype("auto") == torch.bfloat16 and compute_dtype("float32") == torch.float32
    args = training_arguments(TrainConfig(extra_args={"adam_beta2": 0.99}), Path("/tmp/x"), has_eval=True)
    assert args.optim == "adamw_torch" and args.bf16 is True and args.fp16 is False  # bf16 autocast, as on a GPU
    assert args.activation_checkpointing is False  # on the model already when asked for (enable_checkpointing)
    assert args.eval_strategy == "no" and args.adam_beta2 == 0.99 and args.ddp_find_unused_parameters is False
    args = training_arguments(TrainConfig(eval_steps=5, optim="paged_adamw_8bit"), Path("/tmp/x"), has_eval=True)
    assert args.eval_strategy == "steps" and args.eval_steps == 5 and args.prediction_loss_only is True
    assert args.optim == "paged_adamw_8bit"


@pytest.mark.parametrize("upcast_frozen", [True, False], ids=["peft-prepared", "kept-in-dtype"])
def test_checkpointing_is_enabled_once_non_reentrant_and_keeps_the_gradients(built, upcast_frozen):
    import warnings

    import torch

    from loraflow.stages.train.collators import CompletionCollator
    from loraflow.stages.model import load_for_training

    handle, quant = built["nf4"], QuantizationConfig(mode="nf4", compute_dtype="float32")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(10, 5000, (12 + 3 * i,), generator=g).tolist()} for i in range(3)]
    batch = CompletionCollator(pad_token_id=0)([{**r, "labels": [-100] * 8 + r["input_ids"][8:]} for r in rows])

    def grads(checkpointing: bool):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_for_training(handle, ModelConfig(name_or_path="unused"), quant, checkpointing, upcast_frozen)
            model.train()
            for name, p in model.named_parameters():  # B = 0 at init would leave A without a gradient
                if "lora_B" in name:
                    p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            torch.manual_seed(0)
            model(**batch, use_cache=False).loss.backward()
        assert not [w for w in caught if "use_reentrant" in str(w.message)]  # torch was told, not left to pick
        return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model, with_ckpt = grads(True)
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)
    assert len(model.get_input_embeddings()._forward_hooks) <= 1  # enabled once: one input-grad hook at most
    _, without = grads(False)
    assert with_ckpt.keys() == without.keys()
    assert all(with_ckpt[n].abs().sum() > 0 for n in with_ckpt if ".layers.0." in n)  # layer 0's LoRA learns too
    for n in without:
        torch.testing.assert_close(with_ckpt[n], without[n], rtol=1e-4, atol=1e-6)


def test_models_built_in_parallel_threads_leave_transformers_intact(tiny_llama_dir):
    # transformers swaps torch.nn.init and tie_weights for no-ops while it builds a model; without
    # loraflow's build lock, threads restore each other's no-ops and later models come out untied.
    import threading

    import torch
    from transformers import PreTrainedModel

    from loraflow.config import ModelConfig, QuantizationConfig
    from loraflow.stages.model import load_base

    tie, init = PreTrainedModel.tie_weights, torch.nn.init.normal_
    cfg, quant = ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig(mode="none")
    errors: list[BaseException] = []

    def build() -> None:
        try:
            for _ in range(4):
                load_base(tiny_llama_dir, cfg, quant)
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert PreTrainedModel.tie_weights is tie and torch.nn.init.normal_ is init
    model = load_base(tiny_llama_dir, cfg, quant)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the checkpoint says


def test_the_model_stage_built_in_the_early_training_process_is_the_one_built_here(built, tiny_llama_dir, tmp_path):
    """`launch.build_model`: with a training process started early, the model stage is built there (and training
    goes on with that model: loaded once per run). What it writes is what the stage writes in the flow process."""
    from safetensors.torch import load_file

    from loraflow.config import build_config
    from loraflow.hardware import resolve
    from loraflow.stages import launch

    cfg = resolve(build_config({"model": {"name_or_path": str(tiny_llama_dir)}, "lora": {"r": 4},
                                "quantization": {"mode": "nf4", "compute_dtype": "float32"},
                                "run": {"output_dir": str(tmp_path / "runs")}}))
    assert launch.build_model(None, "k", cfg.model, cfg.quantization, cfg.lora, tmp_path, None) is None  # none started
    ahead, asked = tmp_path / "built-ahead", tmp_path / "built-when-asked"
    ahead.mkdir(), asked.mkdir()
    with launch.early_start(cfg, tmp_path / "runs", "a-train-key"):
        proc = launch._EARLY["a-train-key"]
        launch.start_model_build(cfg, tmp_path / "runs", "a-train-key", "a-model-key")  # as the flow does
        staging = launch._BUILDING["a-train-key"][1]
        summaries = [launch.build_model("a-train-key", "a-model-key", cfg.model, cfg.quantization, cfg.lora, ahead, None),
                     launch.build_model("a-train-key", "a-model-key", cfg.model, cfg.quantization, cfg.lora, asked, None)]
        assert proc.poll() is None  # it waits for its train request
    assert not staging.exists()
    here = built["nf4"]
    here_init = load_file(Path(here.path) / "adapter_init" / "adapter_model.safetensors")
    for summary, out in zip(summaries, (ahead, asked)):
        assert summary == here.info
        there_init = load_file(out / "adapter_init" / "adapter_model.safetensors")
        assert there_init.keys() == here_init.keys() and all((there_init[k] == here_init[k]).all() for k in here_init)
    assert proc.returncode is not None and not launch._EARLY  # no train request came: ended with the block


def test_a_base_is_quantized_once_and_loaded_from_its_4bit_copy_after(tiny_llama_dir, tmp_path):
    """bitsandbytes' NF4 quantization on a CPU is most of a model load (1.1 of SmolLM2's 1.8 s): the 4-bit base is
    kept in the cache, per source content and setting, and a later load reads it, bit for bit what quantizing gives."""
    import torch

    from loraflow.stages.model import load_base, quantized_copy
    from loraflow.store.artifacts import is_complete

    model, cache = ModelConfig(name_or_path=str(tiny_llama_dir)), str(tmp_path / "cache")
    quant = QuantizationConfig(mode="nf4", compute_dtype="float32")
    copy = quantized_copy(tiny_llama_dir, model, quant, cache)
    fresh = load_base(tiny_llama_dir, model, quant, cache_dir=cache)
    assert Path(fresh.name_or_path) == Path(tiny_llama_dir) and is_complete(copy)
    again = load_base(tiny_llama_dir, model, quant, cache_dir=cache)
    assert Path(again.name_or_path) == copy  # read from the 4-bit copy
    a, b = fresh.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, again(x).logits)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # tied, as the checkpoint says

    others = [QuantizationConfig(mode="fp4", compute_dtype="float32"),
              QuantizationConfig(mode="nf4", double_quant=False, compute_dtype="float32"),
              QuantizationConfig(mode="nf4", compute_dtype="bfloat16")]
    assert len({quantized_copy(tiny_llama_dir, model, q, cache) for q in others} | {copy}) == 4
    assert quantized_copy(tiny_llama_dir, model, QuantizationConfig(mode="none"), cache) is None
    custom = ModelConfig(name_or_path=str(tiny_llama_dir), trust_remote_code=True)  # its code is not in a copy
    assert quantized_copy(tiny_llama_dir, custom, quant, cache) is None
    import shutil

    snapshots = tmp_path / "hub" / "models--org--tiny" / "snapshots"  # a Hugging Face cache snapshot: its commit
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_llama_dir, snapshots / commit)
    at_a, at_b = (quantized_copy(snapshots / c, model, quant, cache) for c in ("a" * 40, "b" * 40))
    assert at_a != at_b and at_a == quantized_copy(snapshots / ("a" * 40), model, quant, cache)

    weights = next(copy.glob("*.safetensors"))  # a damaged copy is never read: quantized again, and rewritten
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(damaged)
    third = load_base(tiny_llama_dir, model, quant, cache_dir=cache)
    assert Path(third.name_or_path) == Path(tiny_llama_dir) and is_complete(copy)
