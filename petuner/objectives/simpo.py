"""``loss=simpo``: SimPO (Meng, Xia and Chen, 2024, "SimPO: Simple Preference Optimization with a
Reference-Free Reward"): the reward is the length-normalised log-probability β·(1/|y|) log π(y|x), no
reference model, and the loss asks the chosen reward to beat the rejected one by a margin γ:

    −log σ(β·(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)

(with ``label_smoothing`` ε, TRL's CPOTrainer's conservative form). TRL: CPOTrainer with
``loss_type="simpo"``, ``simpo_gamma`` = γ, ``cpo_alpha`` = our ``rpo_alpha`` (0 for SimPO proper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from petuner.objectives.pairs import Logps, PairObjective
from petuner.objectives.registry import register_objective
from petuner.objectives.schema import ObjectiveSchema
from petuner.schema import number


@dataclass
class SimPOSchema(ObjectiveSchema):
    name: str = "simpo"
    beta: float = number(2.0)  # > 0: the reward's scale (the paper uses 2 to 2.5)
    gamma: float = number(0.5, strict=False)  # the target reward margin γ (TRL's simpo_gamma)
    label_smoothing: float = number(0.0, strict=False, below=0.5)
    rpo_alpha: float | None = number(None, strict=False, optional=True)  # weight of an SFT term on the chosen replies


@register_objective
class SimPO(PairObjective):
    name = "simpo"
    schema: ClassVar[type] = SimPOSchema

    def pair_loss(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta, smoothing = float(self.cfg.beta), float(self.cfg.label_smoothing)
        mean = policy.mean()
        logits = beta * (mean.chosen - mean.rejected) - float(self.cfg.gamma)
        losses = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
        return losses, beta * mean.chosen, beta * mean.rejected
