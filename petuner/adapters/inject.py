"""Apply an adapter method to a model: freeze the base, wrap the targets, unfreeze what trains.

Adapter tensors are then put in ``adapter_dtype`` (fp32 by default, over any base dtype, as peft's
``autocast_adapter_dtype``): an adapter trained in bf16 loses every update below bf16's resolution
(~0.4% of a value), which at usual learning rates is most of them. Each tensor also gets storage of
its own: a parameter that is a strided view into a decomposition (e.g. a slice of an SVD or LU factor)
is mis-updated by fused optimizers and keeps the whole matrix alive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from petuner.adapters.base import AdapterLayer, AdapterMethod, Injection, adapter_layers
from petuner.errors import PetunerError


def inject(model: nn.Module, method: AdapterMethod, head_modules: Sequence[str] = (),
           adapter_dtype: torch.dtype | None = torch.float32) -> Injection:
    """Wrap ``method``'s targets in place and set ``requires_grad`` on exactly what trains.

    ``head_modules`` (e.g. a new classification head) always train and are saved with the adapter.
    Adapter layers' floating-point parameters and buffers are cast to ``adapter_dtype`` (None: kept
    as the method made them); every one of them ends up owning contiguous storage.
    """
    injection = method.apply(model, head_modules)
    for _, layer in adapter_layers(model):
        own_adapter_tensors(layer, adapter_dtype)
    return injection


def owned(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (floating point only), contiguous and owning all of its storage."""
    out = tensor.detach()
    if dtype is not None and out.is_floating_point() and out.dtype != dtype:
        out = out.to(dtype)
    if not out.is_contiguous() or out.untyped_storage().nbytes() != out.numel() * out.element_size() \
            or out.storage_offset() != 0:
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def own_adapter_tensors(layer: AdapterLayer, dtype: torch.dtype | None) -> None:
    """Put ``layer``'s adapter parameters and buffers in ``dtype`` with storage of their own."""
    for p in layer.adapter_parameters():
        p.data = owned(p.data, dtype)
    for name, buf in layer.adapter_buffers().items():
        owner, _, leaf = name.rpartition(".")
        module = layer.get_submodule(owner) if owner else layer
        module._buffers[leaf] = owned(buf, dtype)


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


