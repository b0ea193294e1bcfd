"""The model's repeated blocks: the unit of FSDP2 sharding and of compilation."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers never splits across devices (``_no_split_modules``: a model's decoder layers);
    for a model without that list, the items of its longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
