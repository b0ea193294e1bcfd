"""trainer.compile=true: ``torch.compile`` each decoder layer in place (the whole model if it has none).

Per layer, as torchtune and torchtitan compile: the decoder layers are identical code, so dynamo builds
one graph that every layer reuses with its own weights, and the output path (labelled logits, the chunked
loss, their hooks) stays eager. Against the whole model, compilation is several times shorter and steps
no slower (docs/performance.md, "Switches": measured on SmolLM2). Compiling in place
(``nn.Module.compile``) keeps the module tree, parameter names and hooks, so checkpoints, adapter state
dicts and exports are those of the eager model.
"""

from __future__ import annotations

import logging

from torch import nn

from petuner.train.blocks import decoder_layers

log = logging.getLogger(__name__)


def compile_model(model: nn.Module) -> None:
    """Compile ``model``'s decoder layers (lazily: dynamo traces at the first forward)."""
    layers = decoder_layers(model)
    if not layers:
        log.info("torch.compile: no stack of layers found; compiling the whole model")
        model.compile()
        return
    for layer in layers:
        layer.compile()
    log.info("torch.compile: each of the %d decoder layers (one graph for all)", len(layers))
