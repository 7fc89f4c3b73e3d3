"""`CompletionTrainer`: a `transformers.Trainer` that computes the LM head only where there are labels.

With completion-only loss most positions are prompt (SciTLDR: ~26 target tokens of ~260), yet a plain
causal-LM forward projects *every* position onto the vocabulary: SmolLM2's 49k-word head is ~20% of
its FLOPs, and the (batch, seq, vocab) logits plus their gradient are the largest activations of a
step. Here the decoder body runs as usual, and only the hidden states whose next token is a label go
through the head: (K, d) @ (d, vocab) for K label positions. The loss is the same number as the
model's own (a test checks it); models whose head is not a plain projection fall back to it.

Also counts the label tokens, positions and attention sizes trained on, for train_metrics.json's
throughput and FLOP figures (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from loraflow.stages.prompts import IGNORE_INDEX

log = logging.getLogger("loraflow")


def body_and_head(model) -> tuple[Any, Any] | None:
    """(decoder body, LM head) of a (peft-wrapped) causal LM, or None when logits are not just head(hidden)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None  # Gemma-2 style soft-capping, Cohere/Granite scaling: leave the logits to the model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None or body is base:
        return None
    return body, head


def label_only_loss(body, head, inputs: dict[str, Any], num_items_in_batch=None):
    """Cross-entropy of the next token at label positions, computing logits only there.

    Position t predicts token t+1, so hidden[:, :-1] pairs with labels[:, 1:]. The sum is divided by
    `num_items_in_batch` (label tokens across the accumulated batch, as Trainer counts them) when given,
    else by this batch's label count: the same reductions as transformers' ForCausalLMLoss.
    """
    import torch.nn.functional as F

    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = body(**model_inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, d)
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    logits = head(hidden[keep])  # (K, vocab): the only logits computed
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    n_labels = keep.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else n_labels.clamp(min=1)
    return loss / denominator, n_labels


def forward_label_only_loss(model, inputs: dict[str, Any], num_items_in_batch=None):
    """`label_only_loss` through the model's own forward (so through DDP's wrapper, which all-reduces the
    gradients): transformers' `logits_to_keep` with a boolean (batch, seq) mask projects only the positions
    whose next token is a label onto the vocabulary."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])  # (K, vocab), in the mask's row-major order
    loss = F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]].to(logits.device), reduction="sum")
    n_labels = keep.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else n_labels.clamp(min=1)
    return loss / denominator, n_labels


def accepts_logits_mask(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class WindowedLengthSampler(LengthGroupedSampler):
    """Length-grouped batches that are the random order regrouped (`train.batching: length_grouped`).

    Two changes to transformers' `LengthGroupedSampler`, which sorts each window of the random order by
    length, longest first, and draws that order from the global RNG:
    - The permutation comes from the generator accelerate's random sampler uses (`data_seed + epoch`), so
      each window of `mega_batch_mult * batch` examples holds the examples random batching puts there with
      the same seed (only the run's longest example moves into the first batch), and each epoch's order is
      a function of the seed and the epoch alone.
    - The batches of a window run in a random order (the one with the run's longest example first, so a
      batch too big for memory fails at once). Sorted, every window was a long-to-short curriculum whose
      last, low-learning-rate steps saw only the shortest examples: in a 16-step run (one window) that cost
      aclsum ~0.8-1.3 ROUGE-L against random batches of the same examples (docs/benchmarks.md).
    Each batch still holds neighbours in length, so the padding saved is the same.
    """

    def __init__(self, batch_size: int, *, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Trainer calls it at every epoch's start
        self.epoch = epoch

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n, size = len(self.lengths), self.batch_size
        mult = max(min(n // (size * 4), 50), 1)  # transformers' default window, in batches
        grouped = get_length_grouped_indices(self.lengths, size, mega_batch_mult=mult, generator=generator)
        order: list[int] = []
        for start in range(0, n, mult * size):
            window = grouped[start:start + mult * size]
            batches = [window[i:i + size] for i in range(0, len(window), size)]
            first = 1 if start == 0 else 0  # the batch with the run's longest example stays first
            full = len(batches) if len(batches[-1]) == size else len(batches) - 1  # a short last batch stays last
            moved = [batches[first + i] for i in torch.randperm(full - first, generator=generator).tolist()]
            order += [i for batch in batches[:first] + moved + batches[full:] for i in batch]
        return iter(order)


class CompletionTrainer(Trainer):
    """Trainer whose loss computes logits only on label positions (when the model allows it)."""

    def __init__(self, *args, label_only_logits: bool = True, rouge_eval=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rouge_eval = rouge_eval  # model -> validation ROUGE-L F1, added to each evaluation's metrics
        self.parts = body_and_head(self.model) if label_only_logits else None
        if label_only_logits and self.parts is None:
            log.info("train: this model's logits are not a plain projection; computing them at every position")
        self.through_forward = False
        if self.parts is not None and self.args.world_size > 1:
            # DDP all-reduces gradients only for a forward that goes through its wrapper; calling the
            # body directly would train each rank on its own. Ask the model's forward for label-only logits.
            self.through_forward = accepts_logits_mask(self.model)
            if not self.through_forward:
                self.parts = None
                if self.args.process_index == 0:
                    log.info("train: %d processes and no logits_to_keep: the LM head runs at every position",
                             self.args.world_size)
        if self.parts is not None:
            # Trainer counts the label tokens of the whole accumulated batch only for models that take
            # loss kwargs; our loss divides by that count, so it is already scaled for accumulation.
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True
        self.label_tokens_seen = 0  # tokens the loss is on
        self.positions_seen = 0  # positions the body ran on, padding included (batch * padded length)
        self.attention_square_sum = 0  # sum over rows of padded length**2: the attention matmuls' size
        self.examples_seen = 0  # training examples this process stepped through

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return WindowedLengthSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed)
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            rows, length = inputs["input_ids"].shape
            packed = inputs.get("position_ids")
            self.examples_seen += rows if packed is None else int((packed == 0).sum())
            self.label_tokens_seen += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            self.positions_seen += rows * length
            self.attention_square_sum += rows * length * length
        if self.parts is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.through_forward and model.training:  # `model` is DDP's wrapper here: see __init__
            return forward_label_only_loss(model, inputs, num_items_in_batch)[0]
        with self.accelerator.autocast():  # the body is called directly, not through the forward accelerate wraps
            return label_only_loss(*self.parts, inputs, num_items_in_batch)[0]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Under bf16 autocast, peft's LoRA layers keep their input in bf16 for the whole step: forward, and the
        backward that recomputes checkpointed layers outside any context around the forward. On a CUDA device
        peft skips its cast to the LoRA weights' fp32 under autocast by itself; on a CPU it does not (it asks only
        CUDA's autocast), and the casts to fp32 and back cost CPU step time (docs/benchmarks.md, the autocast
        row). Outside the step (evaluation, generation) the cast is on, as peft leaves it."""
        from peft.helpers import disable_input_dtype_casting

        with disable_input_dtype_casting(model, active=self.args.bf16):
            return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The eval loss, plus `eval_rougeL` from generation when configured: added here, before
        Trainer logs the metrics and hands them to callbacks (best checkpoint, early stopping)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.rouge_eval is not None:
            prefix = metric_key_prefix
            was_training = self.model.training
            self.model.eval()
            output.metrics[f"{prefix}_rougeL"] = self.rouge_eval(self.model)
            self.model.train(was_training)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss without logits: the (batch, seq, vocab) tensor is never built, let alone kept."""
        if self.parts is None or not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast():
            loss, _ = label_only_loss(*self.parts, inputs)
        return loss.detach(), None, None
