"""The shared shape of SVFit and LoLDU: a frozen rank-r sandwich B₀ · diag(d) · A₀ of which only the
diagonal d trains.

Both methods write W = (frozen residual) + B₀ diag(d) A₀ with d starting at d₀, so that the model
starts unchanged. The same function is computed here without touching W:

    y = W x + B₀ · diag(d − d₀) · A₀ x

which keeps the base weight bit-exact (disabling the adapter gives the base model) and makes the
update a rank-r LoRA with A = A₀, B = B₀ diag(d − d₀), scaling 1 — its peft export. The factors are
buffers saved with the adapter, so a reload never depends on a decomposition being recomputed
identically on another device.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterLayer, AdapterMethod, AdapterSchema, LoRAFactors
from petuner.adapters.capabilities import SwitchesOff
from petuner.adapters.lora import check_target_modules, lora_targets
from petuner.schema import checked, number


@dataclass
class FrozenFactorsSchema(AdapterSchema):
    r: int = number(8, integer=True)  # trained diagonal entries per layer
    target_modules: Any = checked("all-linear", check_target_modules)


class FrozenFactorsLinear(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, factor_B: torch.Tensor, factor_A: torch.Tensor,
                 initial_diag: torch.Tensor) -> None:
        super().__init__(base_layer)
        # Copies, not views: a slice of the decomposition would keep the whole SVD/LU matrix alive.
        own = {"dtype": base_layer.weight.dtype, "memory_format": torch.contiguous_format, "copy": True}
        self.register_buffer("factor_B", factor_B.to(**own))  # out × r
        self.register_buffer("factor_A", factor_A.to(**own))  # r × in
        self.register_buffer("initial_diag", initial_diag.to(**own))  # r

    @abstractmethod
    def diagonal(self) -> torch.Tensor:
        """The current diagonal d (r), a function of the trained parameters."""

    def change(self) -> torch.Tensor:
        return self.diagonal() - self.initial_diag

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.factor_A.dtype)
        return (x @ self.factor_A.T * self.change()) @ self.factor_B.T

    def delta_weight(self) -> torch.Tensor:
        return (self.factor_B * self.change()) @ self.factor_A

    def lora_view(self) -> LoRAFactors:
        return LoRAFactors(A=self.factor_A, B=self.factor_B * self.change(), scaling=1.0)


class FrozenFactorsMethod(AdapterMethod, SwitchesOff):
    """What SVFit and LoLDU share as methods: rank-r targets, and a peft export as a scaling-1 LoRA."""

    schema: ClassVar[type[AdapterSchema]] = FrozenFactorsSchema

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        return lora_targets(model, self.cfg, exclude)

    def peft_options(self) -> dict[str, Any]:
        return {}  # a plain LoRA at scaling 1 (the export fits r and lora_alpha to the factors)
