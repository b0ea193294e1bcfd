"""``loss=orpo``: ORPO (Hong, Lee and Thorne, 2024, "ORPO: Monolithic Preference Optimization without
Reference Model"): the SFT loss on the chosen reply plus λ times an odds-ratio term, no reference model:

    L = NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)),   odds(y) = P(y|x) / (1 − P(y|x))

with P the per-token average probability (Eqs. 4–7). ``beta`` is λ (TRL's ORPOConfig name). The NLL
counts the chosen completion's tokens, as the paper writes it; TRL's ORPOTrainer counts the prompt's too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from petuner.objectives.pairs import Logps, PairObjective
from petuner.objectives.registry import register_objective
from petuner.objectives.schema import ObjectiveSchema
from petuner.schema import number


@dataclass
class ORPOSchema(ObjectiveSchema):
    name: str = "orpo"
    beta: float = number(0.1)  # > 0: λ, the odds-ratio term's weight


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2 (Mächler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_objective
class ORPO(PairObjective):
    name = "orpo"
    schema: ClassVar[type] = ORPOSchema

    def pair_loss(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta = float(self.cfg.beta)
        mean = policy.mean()
        log_odds = (mean.chosen - mean.rejected) - (log1mexp(mean.chosen) - log1mexp(mean.rejected))
        return -beta * F.logsigmoid(log_odds), beta * mean.chosen, beta * mean.rejected

    def sft_weight(self) -> float:
        return 1.0  # the NLL term is ORPO's own
