"""The CPU LoRA dropout is dropout: each element dropped with probability p (every 16-bit lane of a draw alike),
the rest scaled by 1/(1-p), gradients through the same mask, identity in eval mode, reproducible under a seed, and
the same mask when activation checkpointing recomputes a layer."""

import math

import pytest
import torch

from loraflow.stages.train.dropout import cpu_dropout, keep_threshold, lane_probability, use_cpu_dropout


@pytest.mark.parametrize("source", ["sfc64", "torch"])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_each_element_is_dropped_with_probability_p_in_every_lane(p, source):
    torch.manual_seed(0)
    n = 4 * 250_000
    y = cpu_dropout(p, source).train()(torch.ones(n))
    dropped = y == 0
    assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - lane_probability(p))))
    sigma = math.sqrt(p * (1 - p) / (n // 4))
    for lane in range(4):  # a draw's four 16-bit lanes: one never dropping would halve a quarter of the rate
        rate = dropped[lane::4].double().mean().item()
        assert abs(rate - p) < 6 * sigma, (lane, rate)


def test_the_probability_is_p_to_within_one_lane_step():
    for p in (0.0, 0.05, 0.1, 0.5, 0.999):
        assert abs((keep_threshold(p) + 32768) / 65536 - p) <= 0.5 / 65536
        assert lane_probability(p) == (keep_threshold(p) + 32768) / 65536


def test_gradients_go_through_the_same_mask_and_eval_mode_is_the_identity():
    torch.manual_seed(1)
    drop = cpu_dropout(0.2).train()
    x = torch.randn(8, 33, requires_grad=True)
    y = drop(x)
    keep = y != 0
    y.backward(torch.full_like(y, 3.0))
    scale = 1 / (1 - lane_probability(0.2))  # 0.2 to within 1/65536
    assert abs(scale - 1 / 0.8) < 1e-4
    torch.testing.assert_close(x.grad, keep * 3.0 * scale)
    torch.testing.assert_close(y, x.detach() * keep * scale)
    assert drop.eval()(x) is x
    assert cpu_dropout(0.0).train()(x) is x
    assert cpu_dropout(1e-6).train()(x) is x  # rounds to 0: nothing dropped, nothing scaled
    for p in (1.0, 1 - 1e-6):  # rounds to 1: not a dropout the lanes can give
        with pytest.raises(ValueError, match="use torch.nn.Dropout"):
            cpu_dropout(p)
    with pytest.raises(ValueError, match="one of sfc64, torch"):
        cpu_dropout(0.1, "numpy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_products_are_torchs_dropout_products_to_the_bit(dtype):
    """Both products run in the input's dtype (the mask converted through uint8) and give the bits of the formulas
    they replace: `x * keep * scale` forward and `aten.native_dropout_backward` backward, in bf16 as under autocast."""
    torch.manual_seed(2)
    drop = cpu_dropout(0.05).train()
    x = torch.randn(3, 40, 576, dtype=dtype, requires_grad=True)
    y = drop(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    keep = (y != 0) | (x == 0)
    assert y.dtype == dtype and x.grad.dtype == dtype and 0.03 < 1 - keep.float().mean() < 0.07
    assert torch.equal(y, x.detach().mul(keep).mul_(drop.scale))
    assert torch.equal(x.grad, torch.ops.aten.native_dropout_backward(grad, keep, drop.scale))


def test_the_same_seed_gives_the_same_mask_and_another_seed_another():
    """torch's seed decides the mask, also where the draws come from SFC64 (seeded by one draw of torch's)."""
    drop = cpu_dropout(0.5).train()
    x = torch.ones(1000)
    masks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        masks.append(drop(x) == 0)
        masks.append(drop(x) == 0)  # the next call: another mask
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[4])


@pytest.fixture(scope="module")
def lora_pair(tiny_llama_dir):
    """The tiny Llama with LoRA (dropout 0.2) twice, the second with activation checkpointing on as training turns
    it on, both with the CPU dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraflow.stages.model import enable_checkpointing

    models = []
    for checkpointing in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        base.config.use_cache = False
        if checkpointing:
            enable_checkpointing(base)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear",
                                                init_lora_weights=False))
        assert use_cpu_dropout(model) == 2 * 7  # every LoRA module of both layers
        models.append(model.train())
    return models


def test_every_lora_dropout_is_replaced_and_no_other_module(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    assert use_cpu_dropout(model) == 0  # p = 0: peft's Identity, left alone
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_dropout=1 - 1e-6, target_modules="all-linear"))
    assert use_cpu_dropout(model) == 0  # a p the lanes round to 1: torch's dropout stays
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    before = [type(m).__name__ for n, m in model.named_modules() if "lora_dropout" not in n]
    assert use_cpu_dropout(model) == 14
    assert [type(m).__name__ for n, m in model.named_modules() if "lora_dropout" not in n] == before
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("lora_dropout.default")} == {"CpuDropout"}


def test_a_checkpointed_layer_recomputes_the_same_mask(lora_pair):
    plain, checkpointed = lora_pair
    ids = torch.randint(10, 5000, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)  # and the dropout is on: another draw, other gradients
    plain(input_ids=ids, labels=ids).loss.backward()
    other = [p.grad.clone() for p in plain.parameters() if p.requires_grad]
    plain.zero_grad()
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0], other, strict=True))
