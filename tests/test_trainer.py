"""The label-only loss equals the model's own loss, and packed batches equal padded ones."""

import pytest
import torch

from loraflow.stages.prompts import IGNORE_INDEX
from loraflow.stages.train.collators import CompletionCollator
from loraflow.stages.train.trainer import body_and_head, label_only_loss


@pytest.fixture(scope="module")
def lora_model(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    base.config.use_cache = False
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def examples(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(10, 5000, (7 + 5 * i,), generator=g).tolist()
        target = torch.randint(10, 5000, (3 + i,), generator=g).tolist()
        out.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    return out


def lora_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return grads


def _through_body_and_head(model, batch):
    parts = body_and_head(model)
    assert parts is not None
    return label_only_loss(*parts, batch)


def _through_forward(model, batch):  # the DDP path: logits_to_keep asked of the (wrapped) model's own forward
    from loraflow.stages.train.trainer import accepts_logits_mask, forward_label_only_loss

    assert accepts_logits_mask(model)
    return forward_label_only_loss(model, batch)


@pytest.mark.parametrize("label_only", [_through_body_and_head, _through_forward], ids=["body-and-head", "forward"])
def test_label_only_loss_and_gradients_match_the_full_logits_loss(lora_model, label_only):
    batch = CompletionCollator(pad_token_id=0)(examples())
    full = lora_model(**batch).loss
    full.backward()
    want = lora_grads(lora_model)

    loss, n_labels = label_only(lora_model, batch)
    loss.backward()
    got = lora_grads(lora_model)
    assert int(n_labels) == 3 + 4 + 5
    torch.testing.assert_close(loss, full)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_num_items_in_batch_turns_the_mean_into_a_sum_over_the_accumulated_batch(lora_model):
    batch = CompletionCollator(pad_token_id=0)(examples())
    parts = body_and_head(lora_model)
    mean, n = label_only_loss(*parts, batch)
    scaled, _ = label_only_loss(*parts, batch, num_items_in_batch=40)
    torch.testing.assert_close(scaled, mean * n / 40)


def test_packed_batch_gives_the_padded_loss_so_examples_do_not_see_each_other(lora_model):
    exs = examples()
    padded = CompletionCollator(pad_token_id=0)(exs)
    from transformers import DataCollatorWithFlattening

    packed = DataCollatorWithFlattening()(exs)  # what train.batching=packed uses (training.make_collator)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in exs))
    assert "attention_mask" not in packed
    assert packed["position_ids"][0, : len(exs[0]["input_ids"]) + 1].tolist()[-2:] == [len(exs[0]["input_ids"]) - 1, 0]
    parts = body_and_head(lora_model)
    with torch.no_grad():
        torch.testing.assert_close(label_only_loss(*parts, packed)[0], label_only_loss(*parts, padded)[0])
        # Positions that ignore the boundaries would let example 2 attend to example 1: a different loss.
        leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
        assert not torch.allclose(label_only_loss(*parts, leaky)[0], label_only_loss(*parts, padded)[0])


def test_models_with_scaled_logits_fall_back_to_their_own_loss(lora_model):
    lora_model.get_base_model().config.final_logit_softcapping = 30.0
    try:
        assert body_and_head(lora_model) is None
    finally:
        lora_model.get_base_model().config.final_logit_softcapping = None
    assert body_and_head(lora_model) is not None


def _epoch_orders(tmp_path, batching: str, seed: int, epochs: int = 2) -> tuple[list[list[int]], list[int]]:
    """The example order loraflow's Trainer draws for each epoch, read from its real train dataloader, and the
    rows' lengths."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from loraflow.stages.train.trainer import CompletionTrainer

    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(5, 300, (256,), generator=g).tolist()
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "idx": list(range(256))})
    args = TrainingArguments(
        output_dir=str(tmp_path / batching), per_device_train_batch_size=4, seed=seed, data_seed=seed,
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random",
        use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = CompletionTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=rows,
                                data_collator=lambda batch: {"idx": [r["idx"] for r in batch]},
                                label_only_logits=False)
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        torch.rand(epoch + 3)  # other code drawing from the global RNG must not move the order
        orders.append([i for batch in loader for i in batch["idx"]])
    return orders, lengths


def test_length_grouped_batches_regroup_the_random_order_window_by_window(tmp_path):
    """`train.batching: length_grouped` regroups each window of the random order of the same seed: a
    16-step run of batch 4 sees the examples random batching would (all but the run's longest, which joins
    the first batch), each epoch's order is a function of the seed and epoch alone, batches hold neighbours
    in length (the padding saved), and they run in a random order, not longest to shortest. transformers'
    own sampler drew the order from the global RNG and sorted each window long to short."""
    window, size = 64, 4  # 256 rows, batch 4: transformers' windows are min(256 // (4 * 4), 50) batches
    for seed in (0, 1):
        grouped, lengths = _epoch_orders(tmp_path, "length_grouped", seed)
        shuffled, _ = _epoch_orders(tmp_path, "random", seed)
        again, _ = _epoch_orders(tmp_path, "length_grouped", seed)
        assert grouped == again
        assert grouped[0] != grouped[1], "each epoch draws a new order"
        longest = max(range(256), key=lambda i: lengths[i])

        def padded(order: list[int]) -> int:
            return sum(size * max(lengths[i] for i in order[b:b + size]) for b in range(0, len(order), size))

        for g_epoch, r_epoch in zip(grouped, shuffled):
            assert lengths[g_epoch[0]] == lengths[longest]
            assert padded(g_epoch) < 0.7 * padded(r_epoch)
            for start in range(0, 256, window):
                g_win, r_win = g_epoch[start:start + window], r_epoch[start:start + window]
                assert len(set(g_win) ^ set(r_win)) <= 2  # equal, but for the longest's swap
                tops = [max(lengths[i] for i in g_win[b:b + size]) for b in range(size, window, size)]
                assert tops != sorted(tops, reverse=True), "a window's batches must not run long to short"
