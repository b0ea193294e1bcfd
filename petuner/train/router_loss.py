"""Mixture-of-experts models: train with the router's load-balancing loss, report it apart from the LM loss.

transformers' MoE causal LMs (Mixtral, Qwen-MoE, OLMoE, ...) add ``router_aux_loss_coef · aux_loss`` to their
loss only when ``output_router_logits`` is on, which their configs leave off: a fine-tune would then drift the
router out of balance with nothing to stop it. ``route_losses`` turns it on, so training uses the auxiliary
loss at the model's own configured coefficient (as pre-training did), and, in evaluation, takes it back out
of ``loss``: the held-out loss stays the language-model loss (comparable with any other model and with plain
transformers), and the evaluation reports the auxiliary loss as ``eval/aux_loss``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def has_router_loss(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(config, "output_router_logits") and hasattr(config, "router_aux_loss_coef")


def route_losses(model: nn.Module) -> bool:
    """Switch a MoE model's auxiliary loss on (training) and out of the evaluation loss; False for other models."""
    if not has_router_loss(model):
        return False
    model.config.output_router_logits = True
    coefficient = float(getattr(model, "router_aux_loss_coef", model.config.router_aux_loss_coef))
    log.info("mixture of experts: training with the router's auxiliary loss × %g (router_aux_loss_coef); "
             "eval/loss is the language-model loss, eval/aux_loss the auxiliary loss", coefficient)

    def language_model_loss(module: nn.Module, args: tuple, output: Any) -> Any:
        aux = getattr(output, "aux_loss", None)
        if not module.training and aux is not None and getattr(output, "loss", None) is not None:
            output.loss = output.loss - coefficient * aux.to(output.loss.device)
        return output

    model.register_forward_hook(language_model_loss)
    return True
