"""KTO's unpaired completions ``{prompt, completion, label: bool}`` (TRL's unlabelled-pair format), and the
batches KTO trains on.

A row is rendered exactly as one side of a preference pair (``petuner.data.preference.completion``: the
chat template turn by turn, the loss on the completion's tokens only); ``prompt`` and ``completion`` are
strings (a user turn and the assistant's reply) or lists of messages. ``label`` true marks a desirable
completion. Preference pairs train KTO too: ``unpaired_rows`` turns each pair into two unpaired rows, the
chosen side desirable and the rejected one not (TRL's ``unpair_preference_dataset``).

Each row also carries its KL row, fixed once over the dataset's order: prompt i with the completion of row
i−1 (cycled over the whole dataset; TRL's ``KL_completion_ids``, which TRL cycles within blocks of one
device batch), whose log-ratio estimates KTO's reference point. Fixed with the data rather than drawn
with each batch, a row's partner does not depend on how batches are drawn or split over processes (the
estimate, a mean over a micro-batch's KL rows, still depends on the micro-batch), and the reference's
log-probabilities of both rows can be computed once before training (``loss.precompute_reference``).
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


def unpaired_rows(pairs: Any) -> Any:
    """Each tokenized pair as two labelled completions, its chosen side desirable and its rejected side not:
    every chosen row, then every rejected row, so a row's KL partner (the row before it) answers another
    prompt (but in a split of one pair)."""
    from datasets import concatenate_datasets

    chosen = pairs.select_columns(["input_ids", "labels"])
    rejected = pairs.select_columns(list(REJECTED)).rename_columns(
        {REJECTED[0]: "input_ids", REJECTED[1]: "labels"}).cast(chosen.features, keep_in_memory=True)
    return concatenate_datasets([side.add_column("desirable", [desirable] * len(side))
                                 for side, desirable in ((chosen, 1), (rejected, 0))])


def mismatched(row: tuple[list[int], list[int]], other: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """Row's prompt (what precedes its first label) with other's completion, labelled on the completion."""
    (ids, labels), (other_ids, other_labels) = row, other
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    other_start = next(i for i, label in enumerate(other_labels) if label != IGNORE)
    return ids[:start] + other_ids[other_start:], [IGNORE] * start + other_labels[other_start:]


def with_kl_rows(dataset: Any) -> Any:
    """Each row's KL row (``kl_input_ids``, ``kl_labels``): its prompt with the previous row's completion,
    the first row taking the last one's."""
    def add(block: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        before = dataset[(indices[0] - 1) % len(dataset)]
        sides = list(zip(block["input_ids"], block["labels"], strict=True))
        previous = [(before["input_ids"], before["labels"]), *sides[:-1]]
        kl = [mismatched(row, other) for row, other in zip(sides, previous, strict=True)]
        return {"kl_input_ids": [ids for ids, _ in kl], "kl_labels": [labels for _, labels in kl]}

    return dataset.map(add, batched=True, with_indices=True, keep_in_memory=True)


def kto_rows(dataset: Any) -> Any:
    """KTO's training rows from a tokenized split of pairs or labelled completions."""
    return with_kl_rows(unpaired_rows(dataset) if REJECTED[0] in dataset.column_names else dataset)


def padded(sides: list[tuple[list[int], list[int]]], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    sides = [(ids[:max_length], labels[:max_length]) for ids, labels in sides]
    width = max(len(ids) for ids, _ in sides)
    return {
        "input_ids": torch.tensor([[*ids, *[pad_token_id] * (width - len(ids))] for ids, _ in sides]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sides]),
        "labels": torch.tensor([[*labels, *[IGNORE] * (width - len(labels))] for _, labels in sides]),
    }


class KTOCollator:
    """A batch of labelled completions and their KL rows (``kl_*``), each right-padded and cut at
    ``max_length``, with ``desirable`` flags (and the precomputed reference's values, where present)."""

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = padded([(r["input_ids"], r["labels"]) for r in rows], self.pad_token_id, self.max_length)
        kl = padded([(r["kl_input_ids"], r["kl_labels"]) for r in rows], self.pad_token_id, self.max_length)
        batch.update({f"kl_{key}": value for key, value in kl.items()})
        batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
        if "reference_logps" in rows[0]:  # precomputed: [completion, KL row] per row
            reference = torch.tensor([r["reference_logps"] for r in rows], dtype=torch.float32)
            batch["reference_logps"], batch["reference_kl_logps"] = reference[:, 0], reference[:, 1]
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
