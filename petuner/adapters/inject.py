"""Apply an adapter method to a model: freeze the base, wrap the targets, unfreeze what trains."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from petuner.adapters.base import AdapterMethod, Injection, adapter_layers
from petuner.errors import PetunerError


def inject(model: nn.Module, method: AdapterMethod, head_modules: Sequence[str] = ()) -> Injection:
    """Wrap ``method``'s targets in place and set ``requires_grad`` on exactly what trains.

    ``head_modules`` (e.g. a new classification head) always train and are saved with the adapter.
    """
    return method.apply(model, head_modules)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a run saves: every trainable parameter plus adapter layers' own buffers, by name."""
    state = {name: p.detach() for name, p in trainable_parameters(model).items()}
    for layer_name, layer in adapter_layers(model):
        for buf_name, buf in layer.adapter_buffers().items():
            state[f"{layer_name}.{buf_name}"] = buf
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved adapter state; every expected key must be present and no extra one."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise PetunerError(f"adapter weights do not fit this model ({what}; {len(missing)} missing, "
                           f"{len(unexpected)} unexpected): were they trained on another base model?")
    with torch.no_grad():
        for name, tensor in expected.items():
            if tensor.shape != state[name].shape:
                raise PetunerError(f"adapter weight {name!r} has shape {tuple(state[name].shape)}, "
                                   f"this model expects {tuple(tensor.shape)}: another base model?")
            tensor.copy_(state[name])


