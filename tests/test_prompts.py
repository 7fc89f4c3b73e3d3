"""Prompt rendering on a real GPT-2 tokenizer with a ChatML-like chat template (see conftest)."""

from __future__ import annotations

import pytest

from loraflow.config import PromptConfig
from loraflow.stages.prompts import PromptError, check_template, completion_text, end_of_turn, render_prompt, stop_token_ids
from loraflow.stages.tokenize import load_tokenizer

ROW = {"input": "We study pretraining on long documents.", "target": "Pretraining helps.",
       "references": ["Pretraining helps."], "aspect": "outcome"}


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


def test_template_style_fills_the_columns(tok):
    cfg = PromptConfig(style="template", template="Summarize the {aspect}:\n{input}\nSummary:")
    assert render_prompt(ROW, cfg, tok) == f"Summarize the outcome:\n{ROW['input']}\nSummary:"


def test_chat_style_wraps_the_template_as_the_user_turn(tok):
    cfg = PromptConfig(style="chat", template="Summarize: {input}")
    assert render_prompt(ROW, cfg, tok) == (
        f"<|im_start|>user\nSummarize: {ROW['input']}<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = render_prompt(ROW, cfg.model_copy(update={"system": "Be brief."}), tok)
    assert with_system == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nSummarize: {ROW['input']}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_style_without_a_chat_template_says_use_template_style(gpt2_tokenizer_dir):
    plain = load_tokenizer(gpt2_tokenizer_dir)
    plain.chat_template = None
    with pytest.raises(PromptError, match="has no chat template: set prompt.style=template"):
        render_prompt(ROW, PromptConfig(style="chat"), plain)


def test_chat_template_that_rejects_a_system_turn_says_unset_it(gpt2_tokenizer_dir):
    strict = load_tokenizer(gpt2_tokenizer_dir)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(PromptError, match="System role not supported.*unset prompt.system"):
        render_prompt(ROW, PromptConfig(style="chat", system="Be brief."), strict)


def test_unknown_field_is_one_line_listing_the_columns(tok):
    with pytest.raises(PromptError) as err:
        render_prompt(ROW, PromptConfig(style="template", template="{title}: {input}"), tok)
    message = str(err.value)
    assert "\n" not in message
    assert "{title}" in message and "use one of {input}, {aspect}" in message


def test_template_reading_the_answer_is_rejected():
    with pytest.raises(PromptError, match=r"uses \{target\}, which is the answer"):
        check_template("{input}\nAnswer: {target}", list(ROW))
    check_template("{aspect}: {input!r}", list(ROW))  # conversions and format specs are fine


def test_completion_ends_where_the_template_ends_a_turn(tok, gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    assert completion_text("Pretraining helps.", tok, PromptConfig(style="template")) == "Pretraining helps.<|endoftext|>"
    # The chat template closes a turn with '<|im_end|>\n'; in GPT-2's vocabulary that is plain text, which
    # nothing could stop on, so EOS follows it.
    assert end_of_turn(tok, PromptConfig(style="chat")) == "<|im_end|>\n<|endoftext|>"
    # With <|im_end|> a special token of its own (SmolLM2, Qwen), the turn ends there and EOS is not added.
    chatml = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert end_of_turn(chatml, PromptConfig(style="chat")) == "<|im_end|>\n"
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert im_end != chatml.eos_token_id
    assert stop_token_ids(chatml, PromptConfig(style="chat")) == [chatml.eos_token_id, im_end]

    class GenerationConfig:  # a model whose own config already lists two stop ids
        eos_token_id = [7, chatml.eos_token_id]

    assert stop_token_ids(chatml, PromptConfig(style="chat"), GenerationConfig()) == [7, chatml.eos_token_id, im_end]
    assert stop_token_ids(chatml, PromptConfig(style="template")) == [chatml.eos_token_id]
