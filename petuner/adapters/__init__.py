"""Adapters: petuner's own PEFT modules, one file per method, found through one registry."""

from petuner.adapters.base import (
    AdapterLayer,
    AdapterMethod,
    LoRAFactors,
    adapter_layers,
    disabled_adapters,
    merge_adapters,
    unload,
    unmerge_adapters,
)
from petuner.adapters.inject import (
    Injection,
    adapter_state_dict,
    inject,
    load_adapter_state_dict,
    trainable_parameters,
)
from petuner.adapters.registry import adapter_names, build_adapter, register_adapter

__all__ = [
    "AdapterLayer",
    "AdapterMethod",
    "Injection",
    "LoRAFactors",
    "adapter_layers",
    "adapter_names",
    "adapter_state_dict",
    "build_adapter",
    "disabled_adapters",
    "inject",
    "load_adapter_state_dict",
    "merge_adapters",
    "register_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
