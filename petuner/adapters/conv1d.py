"""GPT-2-style ``Conv1D`` layers (transformers.pytorch_utils.Conv1D: y = x @ W + b, W stored in × out).

peft adapts them with ``fan_in_fan_out=True``, transposing W wherever it merges. petuner instead hands
every method the equivalent ``nn.Linear`` (weight Wᵀ, same bias, same output): DoRA's row norms, PiSSA's SVD,
the quantized bases and every merge then need no transposed branch. The adapter layer remembers the
origin (``fan_in_fan_out``), and ``to_conv1d`` gives the Conv1D back when the adapter is unloaded, so a
merged export has the base model's own layout and loads into its class unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from petuner.errors import ConfigError


def conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; guard only against a stripped install
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: ``nn.Linear`` or a Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or a Conv1D."""
    if is_conv1d(module):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def to_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what ``module`` (a Conv1D) computes; an ``nn.Linear`` is returned as it is."""
    if not is_conv1d(module):
        return module
    weight = module.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    return linear


def to_conv1d(linear: nn.Linear) -> nn.Module:
    """The Conv1D with ``linear``'s weight (transposed back) and bias."""
    cls = conv1d_class()
    assert cls is not None
    weight = linear.weight
    conv = cls(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        conv.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        if linear.bias is not None:
            conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        else:
            conv.bias = None
    return conv


def refuse_conv1d(model: nn.Module, targets: Sequence[str], who: str) -> None:
    """One line for a method that cannot adapt a Conv1D target."""
    conv = [name for name in targets if is_conv1d(model.get_submodule(name))]
    if conv:
        raise ConfigError(f"{who} cannot adapt GPT-2-style Conv1D layers ({conv[0]} and {len(conv) - 1} more in "
                          f"{type(model).__name__}); use adapter=lora, qlora, dylora or sora")
