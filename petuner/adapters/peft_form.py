"""A trained adapter in peft's LoRA format: what the peft export writes for petuner's own layers.

Every layer gives its update as LoRA factors (``AdapterLayer.lora_view``) and the method the
``LoraConfig`` options its variant needs (``AdapterMethod.peft_options``: DoRA's ``use_dora``, LoRA's
``bias``, ...). ``r`` and ``lora_alpha`` are fitted to the factors themselves, so that peft computes each
layer's scale exactly: layers whose rank or scale differs from the most common one go in peft's
``rank_pattern`` / ``alpha_pattern`` (a SoRA export's ranks differ per layer, a DyLoRA export's rank is
the chosen truncation, a PiSSA export's is 2r).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petuner.adapters.base import LoRAFactors, adapter_layers
from petuner.adapters.inject import trainable_parameters

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}
PEFT_PREFIX = "base_model.model."


def lora_views(model: nn.Module) -> dict[str, LoRAFactors | None]:
    """Every adapter layer's ``lora_view`` by module name."""
    return {name: layer.lora_view() for name, layer in adapter_layers(model)}


def layout_options(model: nn.Module) -> dict[str, Any]:
    """peft's ``fan_in_fan_out`` where an adapted layer is a Conv1D (peft applies it to those layers only)."""
    return {"fan_in_fan_out": True} if any(layer.fan_in_fan_out for _, layer in adapter_layers(model)) else {}


def lora_config(factors: dict[str, LoRAFactors], options: dict[str, Any], task: str, head_modules: Sequence[str],
                base_model_name_or_path: str | None) -> Any:
    """peft's ``LoraConfig`` for ``factors`` (layers of rank 0 left out by the caller)."""
    from peft import LoraConfig

    root = math.sqrt if options.get("use_rslora") else float
    pairs = {name: (f.A.shape[0], f.scaling * root(f.A.shape[0])) for name, f in factors.items()}
    r, alpha = Counter(pairs.values()).most_common(1)[0][0]
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(factors),
                      rank_pattern={n: rank for n, (rank, _) in pairs.items() if rank != r},
                      alpha_pattern={n: a for n, (_, a) in pairs.items() if a != alpha},
                      modules_to_save=list(head_modules) or None, task_type=PEFT_TASK_TYPES[task],
                      base_model_name_or_path=base_model_name_or_path, **options)


def lora_state_dict(model: nn.Module, factors: dict[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """peft LoRA tensors: the factors, plus the biases and task heads that trained alongside."""
    state: dict[str, torch.Tensor] = {}
    for name, lora in factors.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora.A
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora.B
        state.update({f"{PEFT_PREFIX}{name}.{key}": tensor for key, tensor in lora.extra.items()})
    own = tuple(f"{name}." for name, _ in adapter_layers(model))
    for key, tensor in trainable_parameters(model).items():  # not the layers' buffers (LQ-LoRA's packed Q)
        if not key.startswith(own) or ".base_layer." in key:
            state[PEFT_PREFIX + key] = tensor.detach()
    return state
