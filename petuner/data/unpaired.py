"""KTO's unpaired completions ``{prompt, completion, label: bool}`` (TRL's unlabelled-pair format), and the
batches KTO trains on.

A row is rendered exactly as one side of a preference pair (``petuner.data.preference.completion``: the
chat template turn by turn, the loss on the completion's tokens only); ``prompt`` and ``completion`` are
strings (a user turn and the assistant's reply) or lists of messages. ``label`` true marks a desirable
completion. Preference pairs train KTO too: ``KTOCollator`` turns each pair into two unpaired rows, the
chosen side desirable and the rejected one not (TRL's ``unpair_preference_dataset``).

Each batch also carries KTO's KL rows: prompt i with the completion of row i−1 (cycled within the batch,
as TRL's ``KL_completion_ids``), whose log-ratio estimates the reference point. TRL builds them from the
dataset's order in batches; here the collator builds them from the batch actually drawn.
"""

from __future__ import annotations

from typing import Any

import torch

from petuner.data.conversations import with_system_prompt
from petuner.data.preference import REJECTED, _messages, completion, require_fast_tokenizer
from petuner.data.sft import IGNORE
from petuner.errors import ConfigError, PetunerError


def build_unpaired_fn(tokenizer: Any, cfg: Any, where: str) -> Any:
    """The per-row function ``datasets.map`` runs: a raw labelled completion → its tokenized row."""
    require_fast_tokenizer(tokenizer, "unpaired completions")
    system_prompt = cfg.get("system_prompt")

    def tokenize_row(row: dict[str, Any]) -> dict[str, Any]:
        fault = f"{where} row {row['__row__'] + 1}"
        prompt = with_system_prompt(_messages(row["prompt"], "user", f"{fault} (prompt)"), system_prompt)
        reply = _messages(row["completion"], "assistant", f"{fault} (completion)")
        ids, labels, cut = completion(prompt, reply, tokenizer, cfg, fault)
        if cut and cfg.truncation == "drop_turns":
            labels = [IGNORE] * len(ids)  # nothing to learn: dropped
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "desirable": int(row["label"]),
                "truncated": int(cut)}

    return tokenize_row


def unpair(rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int], bool]]:
    """(ids, labels, desirable) of each row; a preference pair gives its chosen side (desirable) and its
    rejected side (not)."""
    if REJECTED[0] not in rows[0]:
        return [(r["input_ids"], r["labels"], bool(r["desirable"])) for r in rows]
    return [(r["input_ids"], r["labels"], True) for r in rows] + [(r[REJECTED[0]], r[REJECTED[1]], False)
                                                                 for r in rows]


def mismatched(examples: list[tuple[list[int], list[int], bool]]) -> list[tuple[list[int], list[int]]]:
    """KL rows: row i's prompt with row i−1's completion (the prompt is what precedes the first label)."""
    starts = [next(i for i, label in enumerate(labels) if label != IGNORE) for _, labels, _ in examples]
    return [(ids[:start] + other[other_start:], [IGNORE] * start + other_labels[other_start:])
            for (ids, _, _), start, (other, other_labels, _), other_start
            in zip(examples, starts, examples[-1:] + examples[:-1], starts[-1:] + starts[:-1], strict=True)]


def padded(sides: list[tuple[list[int], list[int]]], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    sides = [(ids[:max_length], labels[:max_length]) for ids, labels in sides]
    width = max(len(ids) for ids, _ in sides)
    return {
        "input_ids": torch.tensor([[*ids, *[pad_token_id] * (width - len(ids))] for ids, _ in sides]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sides]),
        "labels": torch.tensor([[*labels, *[IGNORE] * (width - len(labels))] for _, labels in sides]),
    }


class KTOCollator:
    """A batch of labelled completions, right-padded, with its KL rows (``kl_*``) and ``desirable`` flags."""

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = unpair(rows)
        batch = padded([(ids, labels) for ids, labels, _ in examples], self.pad_token_id, self.max_length)
        kl = padded(mismatched(examples), self.pad_token_id, self.max_length)
        batch.update({f"kl_{key}": value for key, value in kl.items()})
        batch["desirable"] = torch.tensor([desirable for _, _, desirable in examples])
        return batch



def check_classes(labels: list[Any], where: str, both: bool = True) -> None:
    """Labels are booleans; and, where ``both``, of both classes: KTO learns from the contrast, and one class
    alone gives it nothing to tell apart."""
    bad = next((v for v in labels if not isinstance(v, bool)), None)
    if bad is not None:
        raise PetunerError(f"{where}: label={bad!r}; KTO's label is true (desirable) or false (undesirable)")
    if both and len(set(labels)) < 2:
        raise ConfigError(f"{where}: all {len(labels)} rows are labelled {str(labels[0]).lower()}; loss=kto "
                          "needs both desirable (label true) and undesirable (label false) completions")
