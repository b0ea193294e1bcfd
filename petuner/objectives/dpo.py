"""``loss=dpo``: Direct Preference Optimization and the variants TRL's DPOTrainer names by ``loss_type``.

- ``sigmoid``: DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model"), −log σ(β·Δ), Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected); with
  ``label_smoothing`` ε the conservative cDPO of Mitchell (2023), −(1−ε) log σ(βΔ) − ε log σ(−βΔ).
- ``ipo``: IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", Eq. 17), (Δ̄ − 1/(2β))², Δ̄ on per-token averages as TRL computes it.
- ``hinge``: SLiC's hinge (Zhao et al., 2023, "SLiC-HF"), max(0, 1 − βΔ).
- ``robust``: robust DPO (Chowdhury et al., 2024, "Provably Robust DPO"), the unbiased loss under label
  noise ε: ((1−ε)(−log σ(βΔ)) + ε log σ(−βΔ)) / (1 − 2ε).

Rewards are β·log π/π_ref of each completion (detached), as TRL logs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from petuner.errors import ConfigError
from petuner.objectives.pairs import Logps, PairObjective
from petuner.objectives.registry import register_objective
from petuner.objectives.schema import ObjectiveSchema
from petuner.schema import choice, flag, number

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED = ("sigmoid", "robust")


@dataclass
class DPOSchema(ObjectiveSchema):
    name: str = "dpo"
    beta: float = number(0.1)  # > 0: the strength of the KL tie to the reference (IPO's τ)
    loss_type: str = choice("sigmoid", LOSS_TYPES)
    label_smoothing: float = number(0.0, strict=False, below=0.5)  # sigmoid (cDPO) and robust: the label noise ε
    rpo_alpha: float | None = number(None, strict=False, optional=True)  # weight of an SFT term on the chosen replies
    precompute_reference: bool = flag(False)  # the reference's log-probabilities computed once, before training


def dpo_losses(loss_type: str, beta: float, smoothing: float, policy: Logps,
               reference: Logps) -> torch.Tensor:
    """The loss per pair (TRL's DPOTrainer formulas, by ``loss_type``)."""
    chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    delta = chosen - rejected
    if loss_type == "ipo":
        averaged = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
        return (averaged - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    clean, flipped = -F.logsigmoid(beta * delta), -F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        return ((1 - smoothing) * clean - smoothing * flipped) / (1 - 2 * smoothing)
    return (1 - smoothing) * clean + smoothing * flipped


@register_objective
class DPO(PairObjective):
    name = "dpo"
    schema: ClassVar[type] = DPOSchema
    needs_reference: ClassVar[bool] = True

    def __init__(self, cfg: object) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        if self.cfg.label_smoothing and self.cfg.loss_type not in SMOOTHED:
            raise ConfigError(f"loss.label_smoothing={self.cfg.label_smoothing} applies to loss.loss_type="
                              f"{' or '.join(SMOOTHED)}, not {self.cfg.loss_type}")

    def pair_loss(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert reference is not None
        beta = float(self.cfg.beta)
        losses = dpo_losses(self.cfg.loss_type, beta, float(self.cfg.label_smoothing), policy, reference)
        return losses, beta * (policy.chosen - reference.chosen), beta * (policy.rejected - reference.rejected)
