"""What the loop optimises, as the loop sees it: an objective turns (model, batch) into a loss and metrics.

The loop knows no objective by name (``petuner.objectives`` holds them, one module each, behind a
registry). This base is the model's own loss — next-token cross entropy, or a classifier's — which is
what ``objective=sft`` trains and what a ``Loop`` built without an objective uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petuner.data.sft import IGNORE


def labelled_items(batch: dict[str, torch.Tensor], kind: str) -> int:
    """What a batch's loss averages over: its examples (classification) or its labelled next-token
    positions (labels after the shift that are not IGNORE; true of packed rows too). Counted on the
    host-side batch, before it moves to the device: no synchronisation."""
    labels = batch["labels"]
    return labels.shape[0] if kind == "classification" else int((labels[:, 1:] != IGNORE).sum())


class Objective:
    """The model's own loss. Subclasses override ``items``, ``loss``, ``eval_sums`` and ``eval_metrics``."""

    def prepare_data(self, data: Any, tokenizer: Any, max_length: int) -> None:
        """Reshape ``data``'s splits and set its collator where this objective trains on rows of its own (KTO)."""

    def items(self, batch: dict[str, torch.Tensor], kind: str) -> int:
        """What the batch's mean loss averages over (host side): the loop weighs micro-batches by it."""
        return labelled_items(batch, kind)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean loss (fp32, differentiable) and metrics summed over its items (detached)."""
        return model(**batch).loss.float(), {}

    def eval_keys(self, kind: str) -> tuple[str, ...]:
        """The keys ``eval_sums`` returns, in the order every rank adds them (a rank may have no batch).
        ``aux_*``: a mixture of experts' router loss, where the model's output has one (petuner.train.router_loss)."""
        return ("loss", "items", "aux_loss", "aux_items", *(("correct",) if kind == "classification" else ()))

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
        """Sums over one held-out batch (``loss`` and ``items`` always): added over batches and ranks."""
        n = labelled_items(batch, kind)
        out = model(**batch)
        items = torch.tensor(float(n), dtype=torch.float64, device=out.loss.device)
        sums = {"loss": out.loss.double() * n, "items": items, "aux_loss": torch.zeros_like(items),
                "aux_items": torch.zeros_like(items)}
        if getattr(out, "aux_loss", None) is not None:
            sums.update(aux_loss=out.aux_loss.double() * n, aux_items=items)
        if kind == "classification":
            sums["correct"] = (out.logits.argmax(-1) == batch["labels"]).sum().double()
        return sums

    def eval_metrics(self, kind: str, prefix: str, sums: dict[str, float]) -> dict[str, float]:
        metrics = {f"{prefix}/loss": sums["loss"] / sums["items"]}
        if sums.get("aux_items"):
            metrics[f"{prefix}/aux_loss"] = sums["aux_loss"] / sums["aux_items"]
        if kind == "classification":
            metrics[f"{prefix}/accuracy"] = sums["correct"] / sums["items"]
        else:
            metrics[f"{prefix}/perplexity"] = math.exp(min(metrics[f"{prefix}/loss"], 50.0))
        return metrics
