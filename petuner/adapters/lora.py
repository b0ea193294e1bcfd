"""LoRA (Hu et al., 2021): y = W x + s · B A dropout(x), with W frozen.

A (r × in) starts Kaiming-uniform, B (out × r) at zero, so training starts from the base model.
s = alpha / r, or alpha / sqrt(r) with ``scaling: rslora`` (Kalajdzievski, 2023). Initialisation,
scaling and parameter names match peft's ``LoraLayer``, which the parity tests check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterLayer, AdapterMethod, LoRAFactors, match_targets
from petuner.adapters.registry import register_adapter
from petuner.errors import ConfigError

SCALINGS = ("standard", "rslora")
BIASES = ("none", "all", "lora_only")


def lora_scaling(alpha: float, r: int, scaling: str) -> float:
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard") -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.r = r
        self.scaling = lora_scaling(alpha, r, scaling)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def as_lora(self) -> LoRAFactors:
        return LoRAFactors(A=self.lora_A.weight, B=self.lora_B.weight, scaling=self.scaling)


def _positive_number(cfg: Any, key: str, *, integer: bool = False, allow_zero: bool = False) -> None:
    value = cfg[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0 or (value == 0 and not allow_zero):
        what = "an integer" if integer else "a number"
        raise ConfigError(f"adapter.{key}={value!r}: must be {what} {'>= 0' if allow_zero else '> 0'}")


@register_adapter
class LoRA(AdapterMethod):
    name = "lora"
    options: ClassVar[tuple[str, ...]] = ("r", "alpha", "dropout", "target_modules", "scaling", "bias")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        _positive_number(cfg, "r", integer=True)
        _positive_number(cfg, "alpha")
        _positive_number(cfg, "dropout", allow_zero=True)
        if cfg.dropout >= 1:
            raise ConfigError(f"adapter.dropout={cfg.dropout!r}: must be in [0, 1)")
        if cfg.scaling not in SCALINGS:
            raise ConfigError(f"adapter.scaling={cfg.scaling!r}: allowed: {', '.join(SCALINGS)}")
        if cfg.bias not in BIASES:
            raise ConfigError(f"adapter.bias={cfg.bias!r}: allowed: {', '.join(BIASES)}")

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        targets = match_targets(model, self.cfg.target_modules, exclude)
        for name in targets:
            layer = model.get_submodule(name)
            if self.cfg.r > min(layer.in_features, layer.out_features):
                raise ConfigError(f"adapter.r={self.cfg.r} exceeds the size of {name} "
                                  f"({layer.out_features}×{layer.in_features}); "
                                  f"allowed: 1..{min(layer.in_features, layer.out_features)}")
        return targets

    def make_layer(self, base_layer: nn.Linear) -> LoRALinear:
        c = self.cfg
        return LoRALinear(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, scaling=c.scaling)

    def extra_trainable(self, model: nn.Module, targets: Sequence[str]) -> list[str]:
        names = [n for n, _ in model.named_parameters() if n.endswith(".bias") or n == "bias"]
        if self.cfg.bias == "all":
            return names
        if self.cfg.bias == "lora_only":
            return [n for n in names if n.rsplit(".", 2)[0] in targets]
        return []

    def peft_config(self, targets: Sequence[str], task: str, head_modules: Sequence[str],
                    base_model_name_or_path: str | None) -> Any:
        from peft import LoraConfig

        c = self.cfg
        return LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=list(targets),
                          use_rslora=c.scaling == "rslora", bias=c.bias,
                          modules_to_save=list(head_modules) or None,
                          task_type=self.peft_task_types[task],
                          base_model_name_or_path=base_model_name_or_path)
