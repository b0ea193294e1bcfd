"""A LoRA over a base layer that holds its weight quantized: what QLoRA and LQ-LoRA share.

The quantized weight cannot absorb an update exactly, so merging keeps a dequantized dense copy for
the duration, and ``to_linear`` (the merged export) returns a full-precision ``nn.Linear`` holding the
dequantized base plus the update.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn
from torch.nn import functional as F

from petuner.adapters.lora import LoRALinear


class QuantizedBaseLoRA(LoRALinear):
    """A LoRA over a base layer that holds its weight quantized: merge works on a dequantized copy."""

    def __init__(self, base_layer: nn.Linear, quantized: nn.Module, r: int, alpha: float, dropout: float,
                 scaling: str) -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, scaling=scaling)
        self.base_layer = quantized  # the full-precision weight is dropped here
        self._merged_weight: torch.Tensor | None = None

    @abstractmethod
    def base_weight(self) -> torch.Tensor:
        """The dequantized base weight (out × in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self._merged_weight is not None:
            bias = self.base_layer.bias
            return F.linear(x, self._merged_weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return super().forward(x)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base_weight().to(self.lora_A.weight.dtype) + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_weight = self.merged_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._merged_weight = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A full-precision Linear: dequantized base + adapter."""
        weight = self.merged_weight()
        bias = self.base_layer.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear
