"""Conversations through the tokenizer's chat template, with the loss on the assistant's replies.

The mask comes from rendering the conversation turn by turn: up to each assistant turn with the
generation prompt (the reply starts there), then with the reply (it ends there). Each rendering must
be a prefix of the next and of the whole, which every common template satisfies; ``{% generation %}``
markers would say the same, but most templates lack them. The whole conversation is then tokenized
once, and a token is labelled when its characters fall in a reply: the reply's text and the
template's end-of-turn token, not the whitespace that separates turns.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from petuner.data.conversations import row_tools, to_messages
from petuner.errors import PetunerError

IGNORE = -100
TRAIN_ON = ("assistant", "last_assistant", "all")
TRUNCATION = ("drop_turns", "cut", "error")
# For tokenizers without a chat template (base models). The reply starts on a new line: after "Answer: "
# the space would be a token of its own at generation time but merged into the reply's first word in training.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")


@dataclass
class Rendered:
    text: str
    replies: list[tuple[int, int, int]]  # per assistant turn: (start, labelled end, turn end) in characters


def check_tool_support(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tokenizer: Any,
                       fault: str) -> None:
    """A conversation with tool calls or tools needs a template that renders them (it reads ``tool_calls`` /
    ``tools``); any other template would drop them silently."""
    needs = [key for key, used in (("tool_calls", any(m.get("tool_calls") for m in messages)), ("tools", bool(tools)))
             if used]
    source = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    missing = [key for key in needs if key not in source]
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PetunerError(f"{fault}: the chat template of {name} has no tool support (it never reads "
                           f"{missing[0]!r}); train tool calling on a model whose template renders tools "
                           "(Qwen2.5, Llama 3.1, ...) or set such a chat template on the tokenizer")


def render(messages: list[dict[str, Any]], tokenizer: Any, fault: str,
           tools: list[dict[str, Any]] | None = None) -> Rendered:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    check_tool_support(messages, tools, tokenizer, fault)

    @functools.cache
    def text_of(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)

    whole = text_of(len(messages), False)
    replies = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, full = text_of(i, True), text_of(i + 1, False)
        if not (full.startswith(head) and whole.startswith(full)):
            raise PetunerError(f"{fault}: the chat template is not prefix-stable (the conversation up to turn "
                               f"{i + 1} does not render as a prefix of the whole), so the replies cannot be masked")
        replies.append((len(head), max(len(full.rstrip()), len(head)), len(full)))
    return Rendered(whole, replies)


def _keep(ids: list[int], starts: list[int], replies: list[tuple[int, int, int]], cfg: Any,
          fault: str) -> tuple[int, list[tuple[int, int, int]]]:
    """How many tokens stay, and the replies they hold, under ``data.truncation``."""
    limit = int(cfg.max_length)
    if len(ids) <= limit:
        return len(ids), replies
    if cfg.truncation == "error":
        raise PetunerError(f"{fault}: {len(ids)} tokens exceed data.max_length={limit} "
                           "(data.truncation=error; use drop_turns or cut, or raise data.max_length)")
    if cfg.truncation == "drop_turns":
        ends = [bisect.bisect_left(starts, turn_end) for _, _, turn_end in replies]
        fitting = [k for k, end in enumerate(ends) if end <= limit]
        if fitting:  # whole trailing turns go; a first reply too long for max_length is cut instead
            return ends[fitting[-1]], replies[:fitting[-1] + 1]
    return limit, replies


def tokenize(messages: list[dict[str, Any]], tokenizer: Any, cfg: Any, fault: str,
             tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rendered = render(messages, tokenizer, fault, tools)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    keep, replies = _keep(ids, [s for s, _ in offsets], rendered.replies, cfg, fault)
    ids, offsets = ids[:keep], offsets[:keep]
    if cfg.train_on == "all":
        labels = list(ids)
    else:
        spans = [(a, b) for a, b, _ in (replies[-1:] if cfg.train_on == "last_assistant" else replies)]
        labels = [t if any(s < b and e > a for a, b in spans) else IGNORE
                  for t, (s, e) in zip(ids, offsets, strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "truncated": int(keep < len(enc["input_ids"]))}


def build_fn(tokenizer: Any, cfg: Any, form: str, where: str) -> Any:
    """The per-row function ``datasets.map`` runs: raw row (with its ``__row__`` number) → example."""
    if not getattr(tokenizer, "is_fast", False):
        raise PetunerError("conversations need a fast tokenizer (character offsets); this model's is not")
    system_prompt = cfg.get("system_prompt")
    cfg = SimpleNamespace(max_length=int(cfg.max_length), train_on=cfg.train_on, truncation=cfg.truncation)

    def tokenize_row(row: dict[str, Any]) -> dict[str, Any]:
        fault = f"{where} row {row['__row__'] + 1}"
        return tokenize(to_messages(row, form, system_prompt, fault), tokenizer, cfg, fault, row_tools(row, fault))

    return tokenize_row
