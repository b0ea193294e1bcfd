"""Block-LoRA ("One Head Eight Arms", 2025): LoRA with one down-projection block shared by all input blocks.

The paper partitions LoRA's factors into n blocks and shares every down-projection block; it
publishes no code. The reading implemented here: split the input x (size in) into n equal
consecutive chunks x_1 … x_n (in/n each) that all go through the same A_s (r × in/n), so the n
products collapse into one after an addition:

    ΔW x = s · B · A_s · (x_1 + … + x_n)

which is exactly a plain LoRA whose A is the shared block repeated, A = [A_s A_s … A_s] (r × in).
That is also how it merges and exports to peft (``lora_view``). Parameters per layer: out·r + r·in/n
instead of LoRA's (out + in)·r. A_s starts Kaiming-uniform (as LoRA's A, on its own fan-in in/n),
B at zero; s = alpha/r (or alpha/√r with rslora). n must divide every target's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterSchema, LoRAFactors
from petuner.adapters.conv1d import linear_shape
from petuner.adapters.lora import LoRABase, LoRABaseSchema, LoRALinear
from petuner.adapters.registry import register_adapter
from petuner.errors import ConfigError
from petuner.schema import number


class BlockLoRALinear(LoRALinear):
    """A LoRA layer whose A (``lora_A``, r × in/n) is the shared block A_s."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, n_blocks: int, dropout: float = 0.0,
                 scaling: str = "standard") -> None:
        super().__init__(base_layer, r, alpha, dropout, scaling, a_in_features=base_layer.in_features // n_blocks)
        self.n_blocks = n_blocks

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        summed = x.unflatten(-1, (self.n_blocks, -1)).sum(-2)  # x_1 + … + x_n
        return self.lora_B(self.lora_A(summed) * self.scaling)  # s on the r-wide intermediate, as LoRALinear

    def full_A(self) -> torch.Tensor:
        """The equivalent LoRA's A = [A_s … A_s] (r × in)."""
        return self.lora_A.weight.repeat(1, self.n_blocks)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.full_A()) * self.scaling

    def lora_view(self) -> LoRAFactors:
        return LoRAFactors(A=self.full_A(), B=self.lora_B.weight, scaling=self.scaling)


@dataclass
class BlockLoRASchema(LoRABaseSchema):
    name: str = "block_lora"
    n_blocks: int = number(8, integer=True)  # must divide the input size of every target


@register_adapter
class BlockLoRA(LoRABase):
    """``adapter=block_lora``: LoRA's options plus ``n_blocks``; exports as the equivalent plain LoRA."""

    name = "block_lora"
    schema: ClassVar[type[AdapterSchema]] = BlockLoRASchema

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        targets = super().select_targets(model, exclude)
        n = self.cfg.n_blocks
        for name in targets:
            size = linear_shape(model.get_submodule(name))[1]
            if size % n:
                allowed = [d for d in range(1, size + 1) if size % d == 0]
                raise ConfigError(f"adapter.n_blocks={n} does not divide the input size {size} of {name}; "
                                  f"allowed: a divisor of every target's input size ({size}: "
                                  f"{', '.join(map(str, allowed))})")
        return targets

    def make_layer(self, base_layer: nn.Linear) -> BlockLoRALinear:
        c = self.cfg
        return BlockLoRALinear(base_layer, r=c.r, alpha=c.alpha, n_blocks=c.n_blocks, dropout=c.dropout,
                               scaling=c.scaling)
