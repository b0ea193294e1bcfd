"""Preference pairs ``{prompt, chosen, rejected}`` (TRL's format) → a chosen and a rejected example each.

Three row forms, as TRL reads them:

- conversational: ``prompt`` a list of messages, ``chosen`` and ``rejected`` lists holding the reply;
- plain text: three strings, read as one user turn and the assistant's reply (petuner renders every
  completion with the chat template, as ``data=chat`` does; TRL concatenates plain text as it is);
- implicit prompt: no ``prompt`` column, ``chosen`` and ``rejected`` whole conversations sharing a
  prefix of messages, which is the prompt.

Each side is the prompt and its completion rendered and tokenized by ``petuner.data.sft`` (the same
turn-by-turn rendering as ``data=chat``), labelled on the completion's assistant turns only. The chosen
side is stored in ``input_ids``/``labels`` (so counts and reports read it like any conversation), the
rejected one in ``rejected_input_ids``/``rejected_labels``. A side over ``data.max_length`` is cut
(``truncation=cut``), drops the pair (``drop_turns``: the pair has no turn to spare) or fails (``error``);
a pair whose prompt leaves no completion token is refused, naming its row (TRL drops it silently). Pairs
whose chosen and rejected replies are identical carry no preference: they are dropped, counted, and a
warning says how many. An optional numeric ``margin`` column (TRL's RewardTrainer's) is carried into the
batch for ``loss=reward``.
"""

from __future__ import annotations

from typing import Any

import torch

from petuner.data.conversations import ROLES, _turns, check_alternation, with_system_prompt
from petuner.data.sft import IGNORE, render
from petuner.errors import PetunerError

PAIRED = ("chosen", "rejected")
REJECTED = ("rejected_input_ids", "rejected_labels")


def _messages(value: Any, role: str, fault: str) -> list[dict[str, str]]:
    """A column's value as messages: a string is one ``role`` turn."""
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    return _turns(value, ("role", "content"), {r: r for r in ROLES}, fault)


def split_prompt(chosen: list[dict[str, str]], rejected: list[dict[str, str]],
                 fault: str) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """The implicit-prompt form: the longest shared prefix of messages is the prompt (TRL's extract_prompt)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise PetunerError(f"{fault}: chosen and rejected share no prompt; add a prompt column")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def to_pair(row: dict[str, Any], system_prompt: str | None,
            fault: str) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen, rejected) messages of one row, checked."""
    chosen, rejected = (_messages(row[k], "assistant", f"{fault} ({k})") for k in PAIRED)
    if row.get("prompt") is None:
        prompt, chosen, rejected = split_prompt(chosen, rejected, fault)
    else:
        prompt = _messages(row["prompt"], "user", f"{fault} (prompt)")
    prompt = with_system_prompt(prompt, system_prompt)
    for side in (chosen, rejected):
        check_alternation([*prompt, *side], fault)
    return prompt, chosen, rejected


def completion(prompt: list[dict[str, str]], reply: list[dict[str, str]], tokenizer: Any, cfg: Any,
               fault: str) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of the prompt and one completion, labelled on the completion's replies."""
    messages = [*prompt, *reply]
    rendered = render(messages, tokenizer, fault)
    spans = rendered.replies[sum(m["role"] == "assistant" for m in prompt):]
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [t if any(s < b and e > a for a, b, _ in spans) else IGNORE
              for t, (s, e) in zip(ids, offsets, strict=True)]
    limit = int(cfg.max_length)
    if len(ids) > limit and cfg.truncation == "error":
        raise PetunerError(f"{fault}: {len(ids)} tokens exceed data.max_length={limit} "
                           "(data.truncation=error; use cut or drop_turns, or raise data.max_length)")
    prompt = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    if prompt >= limit - 1:
        raise PetunerError(f"{fault}: the prompt takes {prompt} tokens, so data.max_length={limit} leaves no "
                           "completion token to compare (raise data.max_length, or shorten or drop the row)")
    return ids[:limit], labels[:limit], len(ids) > limit


def require_fast_tokenizer(tokenizer: Any, what: str) -> None:
    """Completions are found by character offsets, which only fast tokenizers give."""
    if not getattr(tokenizer, "is_fast", False):
        raise PetunerError(f"{what} need a fast tokenizer (character offsets); this model's is not")


def build_pair_fn(tokenizer: Any, cfg: Any, where: str) -> Any:
    """The per-row function ``datasets.map`` runs: a raw pair → its two tokenized sides."""
    require_fast_tokenizer(tokenizer, "preference pairs")
    system_prompt = cfg.get("system_prompt")

    def tokenize_row(row: dict[str, Any]) -> dict[str, Any]:
        fault = f"{where} row {row['__row__'] + 1}"
        prompt, chosen, rejected = to_pair(row, system_prompt, fault)
        ids, labels, cut = completion(prompt, chosen, tokenizer, cfg, fault)
        r_ids, r_labels, r_cut = completion(prompt, rejected, tokenizer, cfg, fault)
        if (cut or r_cut) and cfg.truncation == "drop_turns":
            labels, r_labels = [IGNORE] * len(ids), [IGNORE] * len(r_ids)  # nothing to learn: dropped
        out = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "rejected_input_ids": r_ids,
               "rejected_labels": r_labels, "truncated": int(cut or r_cut), "tie": int(chosen == rejected)}
        if "margin" in row:
            out["margin"] = float(row["margin"])  # a number: checked over the column (columns.check_numbers)
        return out

    return tokenize_row


class PairCollator:
    """A batch of pairs as one concatenated forward: rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = [(r["input_ids"], r["labels"]) for r in rows] + [(r["rejected_input_ids"], r["rejected_labels"])
                                                                 for r in rows]
        width = max(len(ids) for ids, _ in sides)
        batch = {
            "input_ids": torch.tensor([[*ids, *[self.pad_token_id] * (width - len(ids))] for ids, _ in sides]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sides]),
            "labels": torch.tensor([[*labels, *[IGNORE] * (width - len(labels))] for _, labels in sides]),
        }
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
        if "reference_logps" in rows[0]:  # precomputed: [chosen, rejected] per row
            ref = torch.tensor([r["reference_logps"] for r in rows], dtype=torch.float32)
            batch["reference_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch
