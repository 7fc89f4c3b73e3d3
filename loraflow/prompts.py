"""Prompt rendering: a format string over the dataset's columns, optionally wrapped in the chat template.

The prompt is everything the model sees before its answer; the completion is the target plus the
EOS token, so a fine-tuned model learns where to stop. Nothing here imports torch or transformers:
the tokenizer is passed in.
"""

from __future__ import annotations

import string
from typing import Any

from loraflow.config import PromptConfig

# Columns that hold the answer: a template that reads them would train on (and evaluate with) the answer.
ANSWER_COLUMNS = ("target", "references")


class PromptError(ValueError):
    """The prompt settings don't fit the data or the tokenizer; the message names the fix."""


def template_fields(template: str) -> set[str]:
    """Column names a format string reads: '{aspect}: {input!r:>10}' -> {'aspect', 'input'}."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # e.g. a lone '{'
        raise PromptError(f"prompt.template is not a valid format string ({err}): write literal braces as {{{{ }}}}") from None
    # '{row.x}' and '{row[0]}' read the column 'row'; '{}' / '{0}' are positional and match no column.
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in parsed if name is not None}


def _columns_hint(columns: list[str]) -> str:
    usable = [c for c in columns if c not in ANSWER_COLUMNS]
    return ", ".join("{" + c + "}" for c in usable)


def check_template(template: str, columns: list[str]) -> None:
    """Fail before any tokenizing if the template reads a missing column or the answer itself."""
    fields = template_fields(template)
    missing = sorted(fields - set(columns))
    if missing:
        raise PromptError(
            f"prompt.template uses {{{missing[0]}}} but the data has no such column: use one of {_columns_hint(columns)}"
        )
    leaked = sorted(fields & set(ANSWER_COLUMNS))
    if leaked:
        raise PromptError(
            f"prompt.template uses {{{leaked[0]}}}, which is the answer the model should learn to write: "
            f"use only input columns such as {_columns_hint(columns)}"
        )


def render_prompt(row: dict[str, Any], prompt: PromptConfig, tokenizer) -> str:
    """The text before the answer. 'template': the filled template; 'chat': the chat template's
    rendering of [system?, user=filled template] ending with the assistant header."""
    try:
        user = prompt.template.format_map(row)
    except (KeyError, IndexError, AttributeError, ValueError):
        check_template(prompt.template, list(row))  # names the missing column when that is the cause
        raise PromptError(
            f"prompt.template {prompt.template!r} cannot be filled from the columns {', '.join(row)}: "
            "use named fields such as {input}"
        ) from None
    if prompt.style == "template":
        return user
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"prompt.style=chat but the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: "
            "set prompt.style=template (and write the whole prompt in prompt.template)"
        )
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    messages.append({"role": "user", "content": user})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja2.TemplateError, e.g. 'System role not supported'
        if type(err).__module__.startswith("jinja2"):
            fix = "unset prompt.system" if prompt.system else "set prompt.style=template"
            raise PromptError(f"the tokenizer's chat template rejected the prompt ({err}): {fix}") from None
        raise


def completion_text(target: str, tokenizer) -> str:
    """The text the model learns to write: the target, then EOS so that generation stops."""
    if tokenizer.eos_token is None:
        raise PromptError(
            "the tokenizer has no eos_token, so a fine-tuned model could not learn to stop: "
            "use a tokenizer with an EOS token (set eos_token in its tokenizer_config.json)"
        )
    return target + tokenizer.eos_token
