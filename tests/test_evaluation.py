"""Generation on CPU: the dequantized, merged model computes what the 4-bit model with its adapter computes.

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
from loraflow.evaluation import generate, use_dequantized
from loraflow.modeling import attach_lora, load_base
from loraflow.tokenization import load_tokenizer
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
    model = attach_lora(base, LoraConfig(r=16, alpha=32, dropout=0.0), quantized=True)
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

