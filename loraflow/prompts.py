"""Prompt rendering: a format string over the dataset's columns, optionally inside the chat template."""

from __future__ import annotations

import string
from typing import Any

from loraflow.config import PromptConfig


class PromptError(ValueError):
    """The prompt settings don't fit the data or the tokenizer; the message names the fix."""


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def check_template(template: str, columns: list[str]) -> None:
    missing = sorted(template_fields(template) - set(columns))
    if missing:
        raise PromptError(
            f"prompt.template uses {{{missing[0]}}} but the data has no such column: use one of "
            f"{', '.join('{' + c + '}' for c in columns)}"
        )


def render_prompt(row: dict[str, Any], prompt: PromptConfig, tokenizer) -> str:
    """The text the model sees before its answer (for chat: ends with the assistant header)."""
    try:
        user = prompt.template.format_map(row)
    except KeyError as err:
        check_template(prompt.template, list(row))
        raise PromptError(f"prompt.template: missing field {err}") from None
    if prompt.style == "template":
        return user
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("the tokenizer has no chat template: set prompt.style=template")
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def leading_special_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before any text (e.g. Llama's BOS); GPT-2 adds none."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []
