"""Generation on CPU: the dequantized, merged model says exactly what the 4-bit model with its adapter says."""

import torch

from loraflow.config import EvalConfig, LoraConfig, ModelConfig, QuantizationConfig
from loraflow.evaluation import generate, use_dequantized
from loraflow.modeling import attach_lora, load_base
from loraflow.tokenization import load_tokenizer


def test_dequantized_merged_generation_matches_the_4bit_model_with_its_adapter(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    quant = QuantizationConfig(mode="nf4")
    tokenizer = load_tokenizer(tiny_llama_dir)
    model = attach_lora(load_base(tiny_llama_dir, ModelConfig(), quant), LoraConfig(r=4), quantized=True)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: zero B would make merging a no-op
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    prompts = [tokenizer(t)["input_ids"] for t in ("The cat sat on", "A short prompt", "Three words here and more")]
    ev = EvalConfig(max_new_tokens=12, batch_size=2)

    model.eval().config.use_cache = True
    want = generate(model, tokenizer, prompts, ev, "4-bit")
    with model.disable_adapter():
        base_want = generate(model, tokenizer, prompts, ev, "4-bit base")
    assert want != base_want  # the adapter changes what is generated

    base = load_base(tiny_llama_dir, ModelConfig(), quant).dequantize()
    assert not any("4bit" in type(m).__name__ for m in base.modules())
    base.eval().config.use_cache = True
    assert generate(base, tokenizer, prompts, ev, "dequantized base") == base_want
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    assert generate(merged, tokenizer, prompts, ev, "dequantized merged") == want


def test_dequantize_auto_means_cpu_only_and_never_without_quantization():
    assert use_dequantized(EvalConfig(), quantized=True) is (not torch.cuda.is_available())
    assert use_dequantized(EvalConfig(dequantize=True), quantized=False) is False
    assert use_dequantized(EvalConfig(dequantize=False), quantized=True) is False
