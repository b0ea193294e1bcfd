"""Padding-free packing: whole tokenized examples share rows of ``max_length``, attention never crosses them.

SFT batches are mostly padding (chatterbot: a median example is a fifth of the longest in its batch).
Packing places whole examples into rows of at most ``max_length`` tokens by first-fit-decreasing
(ties in the order of a permutation seeded by ``data.split_seed``, so the rows are a pure function of the
data config), and each row carries ``position_ids`` that restart at 0 at every example.

Keeping examples apart uses transformers' own packed-sequence path rather than a mask of ours:
``masking_utils.find_packed_sequence_indices`` reads example boundaries off ``position_ids`` when a
forward gets no ``attention_mask``, and builds the block-diagonal causal mask for sdpa and eager;
flash-attention-2 takes the same position ids through its varlen kernel, but only for one flattened row
(``_is_packed_sequence`` requires batch size 1). So the collator keeps the usual 2-D padding mask (the
loop counts real tokens with it), and ``attend_within_examples`` installs a forward pre-hook that drops
it (rows are right-padded and attention is causal, so no real token ever sees padding) or, under
flash-attention-2, flattens the batch's real tokens into one row. transformers' ``DataCollatorWithFlattening``
does only the latter; TRL's ``packing=True`` packs with the same boundaries but by best-fit decreasing.

The first token of every example gets the label -100: in a packed row it would otherwise be the target
of the previous example's last token, a prediction no unpacked batch asks for.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from torch import nn

from petuner.data.sft import IGNORE

PACKABLE_KINDS = ("chat", "sft")  # text is already cut into full blocks; classification has one label per row


def first_fit_decreasing(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most ``capacity``; longest examples placed first,
    equal lengths in seeded order. Each bin keeps its examples in placement order."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: ties stay in the seeded order
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than a row's {capacity}")
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


def pack_examples(examples: Dataset, max_length: int, seed: int) -> Dataset:
    """Rows of whole examples: concatenated ``input_ids`` and ``labels`` (each example's first label -100),
    ``position_ids`` restarting at every example, and an all-ones ``attention_mask``."""
    ids, labels = examples["input_ids"], examples["labels"]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for members in first_fit_decreasing([len(x) for x in ids], max_length, seed):
        row = {key: [] for key in rows}
        for i in members:
            row["input_ids"] += ids[i]
            row["labels"] += [IGNORE, *labels[i][1:]]
            row["position_ids"] += range(len(ids[i]))
        row["attention_mask"] = [1] * len(row["input_ids"])
        for key in rows:
            rows[key].append(row[key])
    return Dataset.from_dict(rows)


class PackedCollator:
    """Right-pads packed rows: ``input_ids`` with the pad token, ``labels`` with -100, ``attention_mask``
    with 0, and ``position_ids`` continuing the row's last example (padding is never attended by a real token)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            last = r["position_ids"][-1] + 1
            out["input_ids"].append([*r["input_ids"], *[self.pad_token_id] * pad])
            out["labels"].append([*r["labels"], *[IGNORE] * pad])
            out["position_ids"].append([*r["position_ids"], *range(last, last + pad)])
            out["attention_mask"].append([*r["attention_mask"], *[0] * pad])
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def pack_bundle(data: Any, tokenizer: Any, max_length: int, seed: int) -> Any:
    """The bundle with its training set and each source's held-out set packed, and the packed collator
    (data.packing=true); the report keeps the example counts and adds the row counts."""
    from petuner.errors import PetunerError

    if not set(data.kind.split("+")) <= set(PACKABLE_KINDS):  # a mixture's kinds are joined by "+"
        raise PetunerError(f"data.packing=true packs {', '.join(PACKABLE_KINDS)} examples; this data is "
                           f"data.kind={data.kind} (text is already cut into full blocks of data.max_length)")
    data.train = pack_examples(data.train, max_length, seed)
    data.set_evals({name: pack_examples(held_out, max_length, seed) for name, held_out in data.evals.items()})
    data.collate = PackedCollator(tokenizer.pad_token_id)
    data.report.update(train_rows=len(data.train), eval_rows=len(data.eval))
    return data


class AttendWithinExamples:
    """The forward pre-hook that turns a packed batch into what the attention implementation reads."""

    def __init__(self, model: nn.Module) -> None:
        self.flatten = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        if positions is None or mask is None or mask.dim() != 2:
            return None
        kwargs = dict(kwargs)
        if self.flatten:  # one row of real tokens: flash-attention's varlen path reads boundaries off positions
            keep = mask.bool()
            for key in ("input_ids", "labels", "position_ids", "inputs_embeds"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = kwargs[key][keep].unsqueeze(0)
        kwargs["attention_mask"] = None  # transformers then builds the block-diagonal mask from position_ids...
        kwargs["use_cache"] = False  # ...but only without a KV cache
        return args, kwargs


def attend_within_examples(model: nn.Module) -> None:
    """Make forwards that get ``position_ids`` with a 2-D padding mask attend only within each packed example.

    Registered first among the model's pre-hooks, so later ones (labelled logits) see the final labels.
    """
    model.register_forward_pre_hook(AttendWithinExamples(model), with_kwargs=True, prepend=True)


@torch.no_grad()
def check_packing_exact(model: nn.Module, lengths: tuple[int, int] = (7, 5)) -> float:
    """Refuse a model whose packed rows leak: two random examples packed in one row (through the installed
    hook) must give the second one the logits it gets alone, within the model dtype's rounding. Returns the
    relative difference measured."""
    first, second = (torch.randint(min(model.config.vocab_size, 1000), (1, n),
                                   generator=torch.Generator().manual_seed(n)) for n in lengths)
    device = next(model.parameters()).device
    row = torch.cat([first, second], 1).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row)).logits
        alone = model(input_ids=second.to(device), attention_mask=torch.ones_like(second).to(device)).logits
    finally:
        model.train(was_training)
    packed, alone = packed[0, lengths[0]:].float(), alone[0].float()
    error = float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6))
    limit = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    if error > limit:
        from petuner.errors import PetunerError

        raise PetunerError(f"data.packing=true: {type(model).__name__} lets packed examples attend to each other "
                           f"(an example's logits after another differ from its own by {error:.2g} relative); "
                           "set data.packing=false")
    return error
