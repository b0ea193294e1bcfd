"""LoLDU (Shi et al., 2024): an LDU decomposition of W of which only a diagonal (and one scale) trains.

W = P L D U (torch.linalg.lu with partial pivoting, fp32; D = diag of the LU's upper factor, U made
unit-diagonal). The first r columns of P L and rows of U stay frozen; the update is
σ · (P L_r) diag(z) U_r with z (r, initialised to D_r) and the scalar σ (initialised to alpha/r)
trained: r + 1 parameters per layer. This follows the authors' code (github.com/SKDDJ/LoLDU,
``minloldu/loldu.py``), whose frozen residual is W − (alpha/r) P L_r diag(D_r) U_r; the paper's text
does not say σ trains, its code does. ``FrozenFactorsLinear`` computes the same function as
W + P L_r diag(σ z − (alpha/r) D_r) U_r, leaving W untouched. The change is a rank-r LoRA
(A = U_r, B = P L_r diag(σ z − (alpha/r) D_r), scaling 1): it merges, and exports to peft as that LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterSchema
from petuner.adapters.frozen_factors import FrozenFactorsLinear, FrozenFactorsMethod, FrozenFactorsSchema
from petuner.adapters.registry import register_adapter
from petuner.schema import number


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L, D, U) with W = P L diag(D) U, L unit lower and U unit upper triangular."""
    p, lower, upper = torch.linalg.lu(weight)
    d = torch.diagonal(upper)
    return p @ lower, d, upper / d[:, None]


class LoLDULinear(FrozenFactorsLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float) -> None:
        with torch.no_grad():
            pl, d, upper = ldu(base_layer.weight.float())
        scale = alpha / r
        super().__init__(base_layer, factor_B=pl[:, :r], factor_A=upper[:r], initial_diag=scale * d[:r])
        dtype = base_layer.weight.dtype
        self.loldu_z = nn.Parameter(d[:r].to(dtype))
        self.loldu_scale = nn.Parameter(torch.tensor(scale, dtype=dtype, device=d.device))

    def diagonal(self) -> torch.Tensor:
        return self.loldu_scale * self.loldu_z


@dataclass
class LoLDUSchema(FrozenFactorsSchema):
    name: str = "loldu"
    alpha: float = number(8.0)  # σ starts at alpha/r


@register_adapter
class LoLDU(FrozenFactorsMethod):
    """``adapter=loldu``: options ``r``, ``alpha`` (σ starts at alpha/r) and ``target_modules``."""

    name = "loldu"
    schema: ClassVar[type[AdapterSchema]] = LoLDUSchema

    def make_layer(self, base_layer: nn.Linear) -> LoLDULinear:
        return LoLDULinear(base_layer, r=self.cfg.r, alpha=self.cfg.alpha)
