"""Output layer and cross entropy over chunks of positions: the tokens × vocabulary logits never exist at once.

For SmolLM2 (49,152 words) the fp32 logits of 4 × 1024 positions are 805 MB, and a training step holds
about three such tensors (the logits, cross entropy's log-softmax, their gradient). Here each chunk of
``chunk`` positions computes its logits, its summed loss and, while the logits are at hand, their
gradient pushed back through the output layer (softmax minus one-hot, times the weight): the backward
pass then only scales the stored gradients. Only one chunk's logits are ever alive, and the FLOPs are
those of the plain path (no recomputation). This is Liger's fused linear cross entropy, in plain torch.

That needs the output layer to be a plain ``nn.Linear`` (tied or not). Any other module (an adapter on
the output layer) is called as a module per chunk under ``torch.utils.checkpoint`` instead, which
recomputes each chunk's logits in the backward pass: one more forward of the output layer (torchtune's
chunked cross entropy does the chunking without the recomputation, so it keeps the logits alive).
Under ``no_grad`` (evaluation) chunks are just a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from petuner.data.sft import IGNORE


def _summed_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")


def _autocast(device: str, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer in autocast's dtype, cast once for every chunk: autocast caches casts only of
    weights that train, so a frozen one would be cast again at each chunk's two matmuls."""
    if not torch.is_autocast_enabled(device):
        return weight, bias
    dtype = torch.get_autocast_dtype(device)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weightᵀ + bias, target_i), with every gradient computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b and bias is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        weight_c, bias_c = _autocast(hidden.device.type, weight, bias)
        # one chunk's logits, written over by every chunk: in fp32 a fresh 50 MB tensor per chunk (256 × 49,152)
        # costs its page faults, ~20% of the matmul on a CPU
        buffer = weight_c.new_empty(min(chunk, hidden.shape[0]), weight_c.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = torch.mm(h.to(weight_c.dtype), weight_c.t(), out=buffer[:len(h)])
            logits = (logits if bias_c is None else logits.add_(bias_c)).float()
            valid = t != IGNORE
            safe = t.masked_fill(~valid, 0)
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # exp(logit - max), in the logits' memory
            sums = probs.sum(dim=-1)
            total += ((top.squeeze(1) + sums.log() - target_logit) * valid).sum()
            # d(sum CE)/d logits = softmax - one_hot, formed in fp32 before any bf16/fp16 matmul (afterwards a
            # confident token's p - 1 would cancel away); ignored rows are zeroed on the hidden-wide products
            probs.div_(sums[:, None])
            probs[torch.arange(len(t), device=t.device), safe] -= 1
            keep = valid.float()[:, None]
            if grad_h is not None:
                grad_h[start:start + chunk] = ((probs.to(weight_c.dtype) @ weight_c).float() * keep).to(hidden.dtype)
            if grad_w is not None:
                grad_w += probs.t() @ (h.float() * keep)
            if grad_b is not None:  # rare (a trained output bias): a pass over the chunk, exact in fp32
                grad_b += (probs * keep).sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (next(saved) * grad_out if present else None for present in ctx.present)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None


def chunked_cross_entropy(head: nn.Module, head_forward: Callable[[torch.Tensor], torch.Tensor],
                          hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed cross entropy of ``head(hidden)`` (positions × hidden) against ``targets`` (-100: ignored);
    ``head_forward`` is the head's own forward (the module's may be deferred to this function)."""
    if type(head) is nn.Linear and torch.is_grad_enabled():
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
    if hidden.shape[0] <= chunk:
        return _summed_loss(head_forward, hidden, targets)
    recompute = torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        total = total + (checkpoint(_summed_loss, head_forward, h, t, use_reentrant=False) if recompute
                         else _summed_loss(head_forward, h, t))
    return total


def token_logps_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each position's log-probability of its target (0 where the target is IGNORE), in fp32, without
    the full log-softmax: logit of the target minus the log-sum-exp."""
    logits = logits.float()
    valid = targets != IGNORE
    picked = logits.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * valid


def _chunk_logps(head_forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    return token_logps_of(head_forward(hidden), targets)


def chunked_token_logps(head_forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                        targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """``token_logps_of(head(hidden), targets)`` chunk by chunk: a preference loss weighs every token's
    gradient by its sequence's own factor, unknown until all log-probabilities are in, so each chunk's
    logits are recomputed in the backward pass (checkpointed) rather than differentiated ahead as above."""
    recompute = torch.is_grad_enabled()
    parts = [checkpoint(_chunk_logps, head_forward, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
             if recompute else _chunk_logps(head_forward, hidden[s:s + chunk], targets[s:s + chunk])
             for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
