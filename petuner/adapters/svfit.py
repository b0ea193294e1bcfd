"""SVFit (Sun et al., 2024): train only the top-r singular values of each target weight.

W = U S Vᵀ (torch.linalg.svd, fp32); the top-r singular vectors U_r, V_r stay frozen and the r
singular values σ (initialised to S_r) are the only trained parameters: r per layer. The paper keeps
the residual W − U_r diag(S_r) V_rᵀ as the frozen base; ``FrozenFactorsLinear`` computes the same
function as W + U_r diag(σ − S_r) V_rᵀ, which leaves W untouched. The change is a rank-r LoRA
(A = V_rᵀ, B = U_r diag(σ − S_r), scaling 1): it merges, and exports to peft as that LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterSchema
from petuner.adapters.frozen_factors import FrozenFactorsLinear, FrozenFactorsMethod, FrozenFactorsSchema
from petuner.adapters.registry import register_adapter


class SVFitLinear(FrozenFactorsLinear):
    def __init__(self, base_layer: nn.Linear, r: int) -> None:
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(base_layer.weight.float(), full_matrices=False)
        super().__init__(base_layer, factor_B=u[:, :r], factor_A=vh[:r], initial_diag=s[:r])
        self.svfit_sigma = nn.Parameter(self.initial_diag.clone())

    def diagonal(self) -> torch.Tensor:
        return self.svfit_sigma


@dataclass
class SVFitSchema(FrozenFactorsSchema):
    name: str = "svfit"


@register_adapter
class SVFit(FrozenFactorsMethod):
    """``adapter=svfit``: options ``r`` (singular values trained per layer) and ``target_modules``."""

    name = "svfit"
    schema: ClassVar[type[AdapterSchema]] = SVFitSchema

    def make_layer(self, base_layer: nn.Linear) -> SVFitLinear:
        return SVFitLinear(base_layer, r=self.cfg.r)
