"""Prompt rendering: a format string over the dataset's columns, optionally wrapped in the chat template.

The prompt is everything the model sees before its answer; the completion is the target plus the
end of turn (`end_of_turn`: what the chat template closes an answer with, else EOS), so a fine-tuned
model learns to stop where its template says a turn ends. Nothing here imports torch or transformers:
the tokenizer is passed in.
"""

from __future__ import annotations

import string
from typing import Any

from loraflow.config import PromptConfig

IGNORE_INDEX = -100  # the label of a prompt token: torch's cross-entropy (and every HF causal-LM loss) skips it

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
    usable = [c for c in columns if c not in (*ANSWER_COLUMNS, "cluster", "messages")]  # not the data stage's own
    return ", ".join("{" + c + "}" for c in usable)


def check_template(template: str, columns: list[str]) -> None:
    """Fail before any tokenizing if the template reads a missing column or the answer itself."""
    fields = template_fields(template)
    missing = sorted(fields - set(columns))
    if missing:
        import difflib

        close = difflib.get_close_matches(missing[0], [c for c in columns if c not in (*ANSWER_COLUMNS, "cluster")], n=1)
        hint = f"did you mean {{{close[0]}}}? " if close else ""
        raise PromptError(
            f"prompt.template uses {{{missing[0]}}} but the data has no such column: {hint}use one of {_columns_hint(columns)}"
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


MARK = "\u2063loraflow-answer\u2063"  # a string no template writes, to find where the answer sits


def end_of_turn(tokenizer, prompt: PromptConfig) -> str:
    """The text that closes the assistant's answer, which the model must learn to write so it stops.

    'chat': what the chat template writes after an assistant message (SmolLM2/Qwen: '<|im_end|>\n',
    Llama-3: '<|eot_id|>', Gemma: '<end_of_turn>\n'), found by rendering a conversation with a marker
    as the answer; plus the EOS token when that text holds no special token (nothing could stop on it).
    'template', or a chat template that does not show its answer: the EOS token.
    """
    eos = tokenizer.eos_token
    if eos is None:
        raise PromptError(
            "the tokenizer has no eos_token, so a fine-tuned model could not learn to stop: "
            "use a tokenizer with an EOS token (set eos_token in its tokenizer_config.json)"
        )
    if prompt.style != "chat" or not getattr(tokenizer, "chat_template", None):
        return eos
    messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [{"role": "user", "content": "x"}]
    try:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": MARK}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation: fall back to EOS
        return eos
    if MARK not in text:
        return eos
    suffix = text.split(MARK, 1)[1]
    return suffix if any(tok in suffix for tok in special_tokens(tokenizer)) else suffix + eos


def special_tokens(tokenizer) -> list[str]:
    """Special and added tokens (those a text can contain whole, as one id)."""
    added = [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)


def stop_token_ids(tokenizer, prompt: PromptConfig, generation_config=None) -> list[int]:
    """Every id generation must stop on: the model's own `eos_token_id` (an id or a list, from its
    generation config), the tokenizer's EOS, and the first special token of the end of turn."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    suffix = end_of_turn(tokenizer, prompt)
    specials = special_tokens(tokenizer)
    first = min(((suffix.find(t), t) for t in specials if t in suffix), default=None)
    if first is not None:
        token_id = tokenizer.convert_tokens_to_ids(first[1])
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def completion_text(target: str, tokenizer, prompt: PromptConfig) -> str:
    """The text the model learns to write: the target, then the end of turn so that generation stops."""
    return target + end_of_turn(tokenizer, prompt)
