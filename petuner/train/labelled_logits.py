"""Logits only where a label needs them: a causal LM's output layer sees only the labelled positions.

transformers' causal LMs apply the output layer to every position, then their loss ignores every
position whose next token is unlabelled (prompt, padding). In instruction batches about one position
in four or five carries a label, while the output layer (hidden × vocabulary: 49k columns for
SmolLM2) costs a fifth of the model's FLOPs and its fp32 logits (batch × length × vocabulary) are the
largest activation of the step. transformers has no option for this: ``logits_to_keep`` keeps the
same positions in every row of the batch.

``keep_labelled_logits`` installs two hooks and a loss function on the model (no change to its
forward, so adapters' forward hooks, such as AdaLoRA's regulariser, still see ``output.loss``): when
a forward gets ``labels``, the output layer receives the hidden states of the labelled positions only,
and the loss is the mean cross entropy over exactly those tokens — the value transformers computes,
for a fraction of the time and memory. Without labels (generation, exports) nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petuner.data.sft import IGNORE


class LabelledLogits:
    """The per-forward state the hooks share: which positions feed the output layer."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.keep: torch.Tensor | None = None      # (batch, length - 1) bool: positions whose next token counts
        self.targets: torch.Tensor | None = None   # the labels of those positions, in the same order
        self.selected = False                      # the output layer did get the selected positions
        self.fallback = model.loss_function        # transformers' own loss, for anything else
        model.register_forward_pre_hook(self.see_labels, with_kwargs=True)
        model.register_forward_hook(self.forget, always_call=True)
        head.register_forward_pre_hook(self.select)

    def see_labels(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            shifted = labels[:, 1:]
            self.keep = shifted != IGNORE
            self.targets = shifted[self.keep]

    def select(self, module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        if self.keep is None or hidden.dim() != 3 or hidden.shape[1] != self.keep.shape[1] + 1:
            return None  # not a labelled forward, or the model already sliced positions itself
        self.selected = True
        return (hidden[:, :-1][self.keep], *args[1:])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> torch.Tensor:
        if not self.selected:
            return self.fallback(logits, labels, vocab_size, **kwargs)
        assert self.targets is not None
        total = kwargs.get("num_items_in_batch")
        if total is None:
            return F.cross_entropy(logits.float(), self.targets)
        return F.cross_entropy(logits.float(), self.targets, reduction="sum") / total

    def forget(self, *_: Any) -> None:
        self.keep = self.targets = None
        self.selected = False


def keep_labelled_logits(model: nn.Module) -> LabelledLogits | None:
    """Install the labelled-positions path on a transformers causal LM; None if it has no output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "loss_function"):
        return None
    state = LabelledLogits(model, head)
    model.loss_function = state.loss
    return state
