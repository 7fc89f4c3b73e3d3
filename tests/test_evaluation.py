"""The evaluate stage scores the model that was trained: on CPU the NF4 weights dequantized once, the adapter
beside them (not merged), computing what the train stage's model computes; a bf16 merge would round away an
adapter's small updates, and is only an opt-in (`eval.merge`), checked here against the 4-bit model.

Where the two paths are the same computation (fp32: bitsandbytes dequantizes and multiplies, as the
dequantized model does once) the greedy outputs are identical. Where they are not (bf16: bitsandbytes'
packed CPU kernel vs a bf16 matmul; an adapter merged into the weights vs added beside them) they agree
to the dtype's rounding: next-token logits within a tolerance and, on a model trained until its choices
are clear of ties, the same greedy text. Bit-exact greedy equality across numerically different paths
holds only until the first near-tie: on a random model, a property of one machine.
"""

import pytest
import torch

from loraflow.config import EvalConfig, LoraConfig, ModelConfig, QuantizationConfig
from loraflow.stages.evaluate import use_dequantized
from loraflow.stages.generation import generate
from loraflow.stages.model import attach_lora, load_base
from loraflow.stages.tokenize import load_tokenizer
from tests_support import train_briefly

# Largest |logit difference| allowed, as a fraction of the logits' range (max |logit|).
TOLERANCE = {"float32": 1e-4, "bfloat16": 4e-2}
PROMPTS = ("The cat sat on", "A short prompt", "Three words here and more")
ANSWER = " once upon a time there was"  # what the trained adapter learns to say after any prompt


def prompt_text(i: int) -> str:
    return f"Prompt number {i}: {PROMPTS[i % len(PROMPTS)]}"


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama_dir, tmp_path_factory):
    """An adapter briefly trained to answer every prompt with ANSWER: the model is then confident, so its
    greedy choices are far from ties and must not depend on the dtype path."""
    tokenizer = load_tokenizer(tiny_llama_dir)
    base = load_base(tiny_llama_dir, ModelConfig(), QuantizationConfig(mode="nf4", compute_dtype="float32"), training=True)
    model = attach_lora(base, LoraConfig(r=16, alpha=32, dropout=0.0))
    target = tokenizer(ANSWER)["input_ids"] + [tokenizer.eos_token_id]
    train_briefly(model, tokenizer, [prompt_text(i) for i in range(120)], target)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def greedy_ids(model, prompt: list[int], steps: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=0)
    return out[0].tolist()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def assert_close_logits(reference, other, prompts: list[list[int]], dtype: str, steps: int) -> list[float]:
    """Teacher-forced on the reference's greedy continuation, the two paths' logits differ by at most
    the dtype's tolerance; returns the reference's top-2 margins at its greedy steps."""
    margins: list[float] = []
    for prompt in prompts:
        ids = greedy_ids(reference, prompt, steps)
        want, got = logits(reference, ids), logits(other, ids)
        diff, scale = float((want - got).abs().max()), float(want.abs().max())
        assert diff <= TOLERANCE[dtype] * scale, (dtype, diff, scale)
        top2 = want[len(prompt) - 1 : -1].topk(2, dim=-1).values
        margins += [m / scale for m in (top2[:, 0] - top2[:, 1]).tolist()]
    return margins


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantized_merged_model_generates_what_the_4bit_model_with_its_adapter_generates(
    tiny_llama_dir, trained_adapter, dtype
):
    from peft import PeftModel

    quant = QuantizationConfig(mode="nf4", compute_dtype=dtype)
    tokenizer = load_tokenizer(tiny_llama_dir)
    prompts = [tokenizer(prompt_text(i))["input_ids"] for i in range(6)]  # three lengths: left padding
    ev = EvalConfig(max_new_tokens=len(tokenizer(ANSWER)["input_ids"]), batch_size=4)
    four_bit = PeftModel.from_pretrained(load_base(tiny_llama_dir, ModelConfig(), quant), trained_adapter).eval()
    four_bit.config.use_cache = True
    base = load_base(tiny_llama_dir, ModelConfig(), quant).dequantize()
    assert not any("4bit" in type(m).__name__ for m in base.modules())
    assert next(base.parameters()).dtype == getattr(torch, dtype)  # dequantized to the compute dtype
    base.eval().config.use_cache = True

    with four_bit.disable_adapter():  # the random base: near-ties everywhere, so logits only...
        assert_close_logits(four_bit, base, prompts, dtype, steps=8)
        if dtype == "float32":  # ...but in fp32 both are one computation: the same greedy text
            assert generate(base, tokenizer, prompts, ev, "dequantized base") == generate(four_bit, tokenizer, prompts, ev, "4-bit base")
        base_text = generate(four_bit, tokenizer, prompts, ev, "4-bit base")
    merged = PeftModel.from_pretrained(base, trained_adapter).merge_and_unload().eval()
    margins = assert_close_logits(four_bit, merged, prompts, dtype, steps=ev.max_new_tokens)
    # The trained model's choices are clear of ties by more than the paths can differ...
    assert min(margins) > 2 * TOLERANCE[dtype], sorted(margins)[:8]
    # ...so batched, left-padded greedy decoding gives the same text on both paths.
    tuned = generate(four_bit, tokenizer, prompts, ev, "4-bit")
    assert tuned != base_text  # the adapter matters
    assert generate(merged, tokenizer, prompts, ev, "dequantized merged") == tuned


def test_dequantize_auto_means_cpu_only_and_never_without_quantization():
    assert use_dequantized(EvalConfig(), quantized=True) is (not torch.cuda.is_available())
    assert use_dequantized(EvalConfig(dequantize=True), quantized=False) is False
    assert use_dequantized(EvalConfig(dequantize=False), quantized=True) is False



def _cfg(dtype: str, **eval_fields):
    from loraflow.config import PipelineConfig

    return PipelineConfig(quantization=QuantizationConfig(mode="nf4", compute_dtype=dtype), eval=EvalConfig(**eval_fields))


def training_model(model_dir, adapter, dtype: str):
    """The model as the train stage computes it (4-bit layers, frozen weights as `train.upcast_frozen: auto`
    leaves them), with `adapter` loaded, in eval mode (dropout off)."""
    from peft import PeftModel

    from loraflow.stages.model import prepare_for_training

    quant = QuantizationConfig(mode="nf4", compute_dtype=dtype)
    base = prepare_for_training(load_base(model_dir, ModelConfig(), quant, training=True), quant, False, "auto")
    return PeftModel.from_pretrained(base, adapter, is_trainable=True).eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_evaluate_stage_scores_the_model_that_was_trained(tiny_llama_dir, trained_adapter, dtype):
    """On CPU the scored model is the dequantized base with the adapter beside it, unmerged: its teacher-forced
    logits are the training model's to the dtype's rounding."""
    from loraflow.stages.evaluate import scored_model

    scored, dequantized = scored_model(_cfg(dtype), tiny_llama_dir, trained_adapter)
    assert dequantized is (not torch.cuda.is_available())
    lora_layers = [m for m in scored.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert lora_layers and not any(getattr(m, "merged", False) for m in lora_layers)  # the adapter is beside the weights
    assert not scored.training
    tokenizer = load_tokenizer(tiny_llama_dir)
    reference = training_model(tiny_llama_dir, trained_adapter, dtype)
    prompts = [tokenizer(prompt_text(i))["input_ids"] for i in range(3)]
    assert_close_logits(reference, scored, prompts, dtype, steps=6)


def test_an_adapter_below_bf16_resolution_still_changes_the_scored_logits(tiny_llama_dir, tmp_path):
    """An update smaller than half a bf16 step of the weight it lands on is rounded away by a bf16 merge, and
    the old evaluate stage (dequantize + merge) scored the base model instead; the unmerged scored model keeps it."""
    from peft import PeftModel

    from loraflow.stages.evaluate import scored_model

    quant = QuantizationConfig(mode="nf4", compute_dtype="bfloat16")
    model = attach_lora(load_base(tiny_llama_dir, ModelConfig(), quant, training=True),
                        LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 2e-5)  # B A alpha/r ~ 5e-6: below half a bf16 step of most weights
    model.save_pretrained(tmp_path / "adapter")

    scored, _ = scored_model(_cfg("bfloat16"), tiny_llama_dir, tmp_path / "adapter")
    dequantized = load_base(tiny_llama_dir, ModelConfig(), quant).dequantize().eval()
    weights = {n: p.clone() for n, p in dequantized.named_parameters()}
    merged = PeftModel.from_pretrained(dequantized, tmp_path / "adapter").merge_and_unload().eval()
    changed = sum(int((p != weights[n]).sum()) for n, p in merged.named_parameters())
    total = sum(p.numel() for n, p in merged.named_parameters() if "proj" in n)
    ids = load_tokenizer(tiny_llama_dir)(prompt_text(0) + ANSWER)["input_ids"]
    reference = logits(training_model(tiny_llama_dir, tmp_path / "adapter", "bfloat16"), ids)
    with scored.disable_adapter():
        base = logits(scored, ids)
    effect = float((reference - base).abs().max())
    assert effect > 0  # the adapter changes what the trained model computes...
    assert changed <= 0.15 * total, changed / total  # ...yet a bf16 merge keeps under 15% of its updates (NF4's zeros)
    lost = float((logits(merged, ids) - reference).abs().max())
    kept = float((logits(scored, ids) - reference).abs().max())
    assert kept <= 0.25 * effect < lost, (kept, effect, lost)  # the scored model keeps them; the merged one did not


def test_merge_into_4bit_weights_is_refused_in_one_line_that_names_the_fix():
    from loraflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"eval.merge=true .* set eval.dequantize=true \(or auto, on CPU\) or eval.merge=false"):
        load_config(None, ["eval.merge=true", "eval.dequantize=false"])
    assert load_config(None, ["eval.merge=true"]).eval.merge is True  # auto: merged where dequantized
    assert load_config(None, ["eval.merge=true", "eval.dequantize=false", "quantization.mode=none"]).eval.merge


def test_a_failed_merged_export_names_the_adapter_and_the_gate():
    from loraflow.config import load_config
    from loraflow.stages.export import rounding_fix

    cfg = load_config(None, ["quantization.compute_dtype=bfloat16"])
    line = rounding_fix(cfg, {"format": "merged"}, "runs/x/train/k/adapter")
    assert "publish the adapter with its base (runs/x/train/k/adapter" in line
    assert "--set export.parity_merged.min_top1_agreement=" in line
    assert rounding_fix(load_config(None, ["export.gguf_type=bf16"]), {"format": "gguf"}, "a")  # 16-bit GGUF: same gate
    assert rounding_fix(cfg, {"format": "gguf"}, "a") == ""  # q8_0: its own gate
