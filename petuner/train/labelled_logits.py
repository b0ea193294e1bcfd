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

Preference objectives need each completion's log-probability, not one mean: inside ``token_logps(model)``
the same labelled forward returns, as ``output.loss``, a (batch, length - 1) tensor holding each labelled
position's log-probability of its next token (0 elsewhere), chunked the same way.

With ``chunk`` (trainer.loss_chunk) the output layer does not run in the model's forward at all: the
loss applies it chunk by chunk (``petuner.train.chunked_loss``), and the output's ``logits`` is None.
``labelled=False`` keeps every position but the last (the chunked loss without the selection).
Under ``no_grad`` (evaluation) a labelled forward always chunks, by ``EVAL_CHUNK`` positions if no
``chunk`` is set: without a backward pass chunking costs nothing, and an evaluation batch's logits
(16 × 256 positions × 49,152 words: 805 MB in fp32, twice over with the log-softmax) would otherwise
be the largest allocation of a run and leave the process's heap that much larger for training.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petuner.data.sft import IGNORE
from petuner.train.chunked_loss import chunked_cross_entropy, chunked_token_logps, token_logps_of

log = logging.getLogger(__name__)

EVAL_CHUNK = 256  # positions per output-layer call under no_grad, when trainer.loss_chunk is not set


class LabelledLogits:
    """The per-forward state the hooks share: which positions feed the output layer."""

    def __init__(self, model: nn.Module, head: nn.Module, labelled: bool = True, chunk: int | None = None,
                 deferrable: bool = True) -> None:
        self.keep: torch.Tensor | None = None      # (batch, length - 1) bool: positions whose next token counts
        self.targets: torch.Tensor | None = None   # the labels of those positions, in the same order
        self.selected = False                      # the output layer did get the selected positions
        self.fallback = model.loss_function        # transformers' own loss, for anything else
        self.labelled, self.chunk = labelled, chunk
        self.deferrable = deferrable  # the model does nothing non-linear between its output layer and the loss
        self.per_token = False  # inside ``token_logps``: the loss is each labelled position's log-probability
        self.head, self.head_forward = head, head.forward
        model.register_forward_pre_hook(self.see_labels, with_kwargs=True)
        model.register_forward_hook(self.forget, always_call=True)
        head.register_forward_pre_hook(self.select)
        head.forward = self.defer  # an instance attribute: the module, its weights and their names stay

    def chunking(self) -> int | None:
        """Positions per output-layer call now: ``chunk``, and always some under no_grad (nothing to recompute)."""
        if not self.deferrable:
            return None
        return self.chunk or (None if torch.is_grad_enabled() else EVAL_CHUNK)

    def see_labels(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            shifted = labels[:, 1:]
            self.keep = shifted != IGNORE if self.labelled else torch.ones_like(shifted, dtype=torch.bool)
            self.targets = shifted[self.keep]

    def select(self, module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        if self.keep is None or hidden.dim() != 3 or hidden.shape[1] != self.keep.shape[1] + 1:
            return None  # not a labelled forward, or the model already sliced positions itself
        self.selected = True
        return (hidden[:, :-1][self.keep], *args[1:])

    def defer(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer under chunking: a selected forward passes its hidden states on to the loss."""
        return hidden if self.selected and self.chunking() else self.head_forward(hidden)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> torch.Tensor:
        if self.per_token:
            return self.position_logps(logits, labels)
        if not self.selected:
            return self.fallback(logits, labels, vocab_size, **kwargs)
        assert self.targets is not None
        total = kwargs.get("num_items_in_batch")
        if total is None:
            total = (self.targets != IGNORE).sum()
        chunk = self.chunking()
        if chunk:  # ``logits`` are the selected hidden states
            return chunked_cross_entropy(self.head, self.head_forward, logits, self.targets, chunk) / total
        return F.cross_entropy(logits.float(), self.targets, ignore_index=IGNORE, reduction="sum") / total

    def position_logps(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, length - 1): each labelled position's log-probability of its next token, 0 elsewhere."""
        if not self.selected:  # full logits: every position
            return token_logps_of(logits[:, :-1], labels[:, 1:])
        assert self.keep is not None and self.targets is not None
        chunk = self.chunking()
        values = (chunked_token_logps(self.head_forward, logits, self.targets, chunk) if chunk
                  else token_logps_of(logits, self.targets))
        return values.new_zeros(self.keep.shape).masked_scatter(self.keep, values)

    def forget(self, module: nn.Module, args: tuple, output: Any) -> Any:
        deferred = self.selected and self.chunking()
        self.keep = self.targets = None
        self.selected = False
        if deferred and getattr(output, "logits", None) is not None:
            output.logits = None  # hidden states, not logits: nobody may read them as such
        return output


def keep_labelled_logits(model: nn.Module, labelled: bool = True, chunk: int | None = None) -> LabelledLogits | None:
    """Install the labelled-positions path (and/or the chunked loss) on a transformers causal LM; None if it
    has no output layer. A model that transforms its logits non-linearly before the loss (Gemma 2's
    ``final_logit_softcapping``) keeps its output layer whole: chunking would skip that transform."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "loss_function"):
        return None
    capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if capped and chunk:
        log.info("trainer.loss_chunk=%d not applied: the model caps its logits (final_logit_softcapping=%s) "
                 "between the output layer and the loss", chunk, capped)
    state = LabelledLogits(model, head, labelled, chunk, deferrable=not capped)
    model.loss_function = state.loss
    return state


def output_path(model: nn.Module) -> LabelledLogits | None:
    """The labelled-positions path installed on ``model`` (or on the module a DDP wrapper holds), if any."""
    model = getattr(model, "module", model)
    state = getattr(getattr(model, "loss_function", None), "__self__", None)
    return state if isinstance(state, LabelledLogits) else None


@contextlib.contextmanager
def token_logps(model: nn.Module) -> Iterator[None]:
    """Forwards with ``labels`` return per-position log-probabilities as ``output.loss`` (see the module's
    docstring); a model without the installed path gets it, labelled positions only, for good."""
    state = output_path(model) or keep_labelled_logits(getattr(model, "module", model))
    if state is None:
        raise TypeError(f"{type(model).__name__} has no output layer to take log-probabilities from")
    state.per_token = True
    try:
        yield
    finally:
        state.per_token = False


def install_output_path(model: nn.Module, trainer: Any, task: str) -> LabelledLogits | None:
    """What a run installs on a causal LM: ``trainer.labelled_logits`` and/or ``trainer.loss_chunk``."""
    if task != "causal_lm" or not (trainer.labelled_logits or trainer.loss_chunk):
        return None
    return keep_labelled_logits(model, trainer.labelled_logits, trainer.loss_chunk)
