"""Output layer and cross entropy over chunks of positions: the tokens × vocabulary logits never exist at once.

For SmolLM2 (49,152 words) the fp32 logits of 4 × 1024 positions are 805 MB, and a training step holds
about three such tensors (the logits, cross entropy's log-softmax, their gradient). Here each chunk of
``chunk`` positions computes its logits and summed loss, keeps neither, and recomputes its logits in the
backward pass (``torch.utils.checkpoint``), so only one chunk's logits are alive at any time. The price is
one more forward of the output layer per chunk; with a single chunk nothing is recomputed, so batches
below ``chunk`` positions run exactly as before. Under ``no_grad`` (evaluation) chunks are just a loop.

The same recipe as torchtune's chunked cross entropy and Liger's fused linear cross entropy, in plain
torch; the output layer is called as a module, so an adapter on it (or a tied embedding) keeps working.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from petuner.data.sft import IGNORE


def _summed_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                          targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed cross entropy of ``head(hidden)`` (positions × hidden) against ``targets`` (-100: ignored)."""
    if hidden.shape[0] <= chunk:
        return _summed_loss(head, hidden, targets)
    recompute = torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        total = total + (checkpoint(_summed_loss, head, h, t, use_reentrant=False) if recompute
                         else _summed_loss(head, h, t))
    return total
