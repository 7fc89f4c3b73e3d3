"""Chat datasets (`data.format: messages`): one conversation per row; the model learns the assistant's turns.

Data stage: `conversation` checks one row's messages and normalises them to [{role, content}] (OpenAI style,
or ShareGPT's {from, value} with `data.role_map`), ending at the last assistant turn: that turn is the target.

Tokenize stage: `encode_conversations` renders each whole conversation once with the tokenizer's chat
template and tokenizes that text once, with character offsets. The labels are the tokens inside the
assistant turns (`prompt.train_on`: the last one, or all), where the template itself puts them: the span
of a turn runs from the end of the template's rendering of everything before it (with the assistant
header) to the end of its rendering with the turn, so it holds the answer and its end of turn. Nothing is
tokenized twice, so no boundary can drift. A template that renders earlier turns differently once a later
one is added (one that strips reasoning from history, say) has no such spans: that is an error naming
`prompt.train_on=last_assistant`, for which only the last turn's boundary must hold.

Too long for `prompt.max_length`: the earliest user/assistant exchanges are dropped (a system message
stays) until it fits; the target is cut to `prompt.max_target_length`, keeping its end of turn. The
generation prompt of validation and test rows is everything before the last answer, with the assistant
header, fitted to `max_length - max_target_length` the same way.
"""

from __future__ import annotations

import json
from typing import Any

from loraflow.stages.prompts import IGNORE_INDEX
from loraflow.config import PromptConfig
from loraflow.stages.prompts import PromptError, end_of_turn

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation row that cannot be trained on; the message names the row and the fix."""


def conversation(value: Any, role_map: dict[str, str], where: str) -> list[dict[str, str]]:
    """The row's messages as [{role, content}], ending with its last assistant turn (later turns are dropped)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ChatError(f"data.messages_column: {where} holds text that is not a JSON list of messages: "
                            "store a list of {role, content}") from None
    if not isinstance(value, list) or not value:
        raise ChatError(f"data.messages_column: {where} holds {type(value).__name__ if value else 'no messages'}, "
                        "not a list of {role, content} messages: fix the row or set data.messages_column")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ChatError(f"data: {where}, message {i} is a {type(message).__name__}, not a {{role, content}} "
                            "mapping: fix the row")
        # `or`: a file mixing both styles loads with every key in every message, the other style's as None
        role = message.get("role") or message.get("from")
        content = message.get("content") or message.get("value")
        role = role_map.get(role, role)
        if role not in ROLES:
            raise ChatError(f"data: {where}, message {i} has the unknown role {role!r}: map it onto one of "
                            f"{', '.join(ROLES)} with data.role_map, e.g. --set 'data.role_map={{{role}: user}}'")
        if not isinstance(content, str) or not content.strip():
            raise ChatError(f"data: {where}, message {i} ({role}) has empty content: fill it or remove the message")
        out.append({"role": role, "content": content})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ChatError(f"data: {where} has no assistant turn, so nothing to learn: add the answer or remove the row")
    return out[: last + 1]


def history_text(messages: list[dict[str, str]]) -> str:
    """Everything before the last answer as plain 'role: content' lines (the row's input, for display and clusters)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])


def _render(tokenizer, messages: list[dict[str, str]], generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    except Exception as err:  # jinja2.TemplateError, e.g. 'System role not supported'
        if type(err).__module__.startswith("jinja2"):
            raise PromptError(f"the tokenizer's chat template rejected a conversation ({err}): unset prompt.system "
                              "or remove the roles it does not support") from None
        raise


def with_system(messages: list[dict[str, str]], prompt: PromptConfig) -> list[dict[str, str]]:
    if prompt.system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": prompt.system}, *messages]
    return messages


def _spans(tokenizer, messages: list[dict[str, str]], train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """(the full rendering, the character spans of the trained assistant turns)."""
    full = _render(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for k in turns if train_on == "all_assistants" else turns[-1:]:
        head = _render(tokenizer, messages[:k], generation=True)
        upto = full if k == len(messages) - 1 else _render(tokenizer, messages[: k + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            fix = "set prompt.train_on=last_assistant" if train_on == "all_assistants" else "use another chat template"
            raise PromptError("the chat template renders earlier turns differently once later turns are added (it "
                              f"rewrites history), so an assistant turn has no fixed place in the conversation: {fix}")
        spans.append((len(head), len(upto)))
    return full, spans


def _fits(messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The conversation, then shorter ones: the earliest exchanges dropped, one user turn at a time."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    return [system + rest[i:] for i in ([0] + [s for s in starts if s > 0])]


def _encode_one(messages: list[dict[str, str]], prompt: PromptConfig, tokenizer, prefix: list[int], stop: list[int],
                eos_appended: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, whether earlier turns were dropped); empty lists when even the last exchange is too long."""
    keep = max(1, prompt.max_target_length - len(stop))
    for n, candidate in enumerate(_fits(messages)):
        full, spans = _spans(tokenizer, candidate, prompt.train_on)
        try:
            enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets
            raise PromptError("data.format=messages needs a fast tokenizer (tokenizer.json), for the token offsets "
                              "that place each turn: save the tokenizer with a tokenizer.json") from None
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX for tok, (start, _) in zip(ids, offsets)]
        if eos_appended:  # the template's end of turn holds no special token: EOS after the answer (prompts.end_of_turn)
            ids, labels = ids + stop[-1:], labels + stop[-1:]
        last = [i for i, (start, _) in enumerate(offsets) if spans[-1][0] <= start < spans[-1][1]]
        if eos_appended:
            last.append(len(ids) - 1)
        if len(last) > keep + len(stop):  # the target is cut, its end of turn kept
            cut = last[0] + keep
            ids = ids[:cut] + stop
            labels = labels[:cut] + stop
        if ids[: len(prefix)] != prefix:
            ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
        if len(ids) <= prompt.max_length:
            return ids, labels, n > 0
    return [], [], True


def _generation_prompt(messages: list[dict[str, str]], tokenizer, prefix: list[int], budget: int) -> tuple[list[int], bool]:
    """Everything before the last answer, with the assistant header, within `budget` tokens."""
    for n, candidate in enumerate(_fits(messages)):
        ids = tokenizer(_render(tokenizer, candidate[:-1], generation=True), add_special_tokens=False)["input_ids"]
        ids = ids if ids[: len(prefix)] == prefix else prefix + ids
        if len(ids) <= budget:
            return ids, n > 0
    return [], True


def encode_conversations(rows: dict[str, list], prompt: PromptConfig, tokenizer, prefix: list[int]) -> dict[str, list]:
    """The messages path's `tokenize.encode_batch`: the same output columns, from the `messages` column
    (JSON, written by the data stage)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"data.format=messages needs a chat template, and the tokenizer of "
                          f"{getattr(tokenizer, 'name_or_path', '?')!r} has none: use a chat model's tokenizer")
    suffix = end_of_turn(tokenizer, prompt)
    stop = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    eos_appended = suffix.endswith(tokenizer.eos_token) and tokenizer.eos_token not in _render(
        tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    budget = prompt.max_length - prompt.max_target_length
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": [], "prompt_truncated": []}
    for raw in rows["messages"]:
        messages = with_system(json.loads(raw), prompt)
        ids, labels, cut = _encode_one(messages, prompt, tokenizer, prefix, stop, eos_appended)
        prompt_ids, prompt_cut = _generation_prompt(messages, tokenizer, prefix, budget)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["prompt_ids"].append(prompt_ids)
        out["truncated"].append(cut)
        out["prompt_truncated"].append(prompt_cut)
    return out
