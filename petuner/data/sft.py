"""Instruction SFT: {prompt, response} rows through the tokenizer's chat template, loss on the answer.

The prompt (system + user turn + the assistant header) and the answer are tokenized separately and
concatenated, so the label mask falls exactly on the answer's tokens (its end-of-turn token
included: the model learns to stop).
"""

from __future__ import annotations

from typing import Any

from petuner.errors import PetunerError

IGNORE = -100
FALLBACK_TEMPLATE = "Question: {prompt}\nAnswer: "


def format_pair(tokenizer: Any, prompt: str, response: str, system_prompt: str | None) -> tuple[str, str]:
    """(prompt text, answer text) such that their concatenation is the full chat-formatted example."""
    if not getattr(tokenizer, "chat_template", None):
        return FALLBACK_TEMPLATE.format(prompt=prompt), response + (tokenizer.eos_token or "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(head):
        raise PetunerError(f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} does not "
                           "render the prompt as a prefix of the full chat, so the answer cannot be masked; set "
                           "model.tokenizer to one whose template does")
    return head, full[len(head):]


def tokenize_pair(row: dict[str, Any], tokenizer: Any, max_length: int,
                  system_prompt: str | None) -> dict[str, list[int]]:
    head, answer = format_pair(tokenizer, str(row["prompt"]), str(row["response"]), system_prompt)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    input_ids = (head_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(head_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build(dataset: Any, tokenizer: Any, cfg: Any) -> Any:
    system_prompt = cfg.system_prompt
    out = dataset.map(tokenize_pair, remove_columns=dataset.column_names,
                      fn_kwargs={"tokenizer": tokenizer, "max_length": int(cfg.max_length),
                                 "system_prompt": system_prompt})
    # An answer truncated away leaves nothing to learn from.
    return out.filter(lambda ex: any(label != IGNORE for label in ex["labels"][1:]))
