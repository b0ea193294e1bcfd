"""trainer.compile=true: ``torch.compile`` the model in place, falling back to each decoder layer alone.

Compiling in place (``nn.Module.compile``) keeps the module tree, parameter names and hooks, so
checkpoints, adapter state dicts and exports are those of the eager model. Dynamo compiles lazily, at
the first forward: if the whole model fails there (a model or adapter dynamo cannot trace), the
repeated decoder layers, where the time goes, are compiled one by one instead and the forward reruns.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of repeated blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len, default=None)


class WholeOrLayers:
    """The model's compiled call: the whole model while dynamo manages; its layers from the first failure on."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.whole = torch.compile(model._call_impl)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.whole(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:
            layers = decoder_layers(self.model)
            if layers is None:
                raise
            log.warning("torch.compile of the whole model failed (%s); compiling its %d layers instead",
                        str(err).splitlines()[0], len(layers))
            self.model._compiled_call_impl = None
            for layer in layers:
                layer.compile()
            return self.model._call_impl(*args, **kwargs)


def compile_model(model: nn.Module) -> None:
    model._compiled_call_impl = WholeOrLayers(model)  # what nn.Module.compile sets, with the fallback
