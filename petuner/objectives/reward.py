"""``loss=reward``: a Bradley–Terry reward model (Bradley and Terry, 1952; as trained for RLHF in Ouyang et
al., 2022, "Training language models to follow instructions with human feedback"): a sequence classifier
with one output, its scalar head trained in full beside the adapter, scores each side of a pair and the
loss asks the chosen score to beat the rejected one:

    −log σ(r(x, y_w) − r(x, y_l) − margin)  [+ c · mean((r_w + r_l)²), TRL's center_rewards_coefficient]

TRL: RewardTrainer. The margin is ``loss.margin`` plus the pair's ``margin`` column where the data has one
(TRL's per-row column). The model is ``model.task=
seq_cls`` on preference pairs; it exports as a sequence-classification model, and ``petuner eval`` scores
held-out pairs with it (rewards/accuracies: how often the chosen reply scores higher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from petuner.objectives.pairs import Pairs
from petuner.objectives.registry import register_objective
from petuner.objectives.schema import ObjectiveSchema
from petuner.schema import number

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class RewardSchema(ObjectiveSchema):
    name: str = "reward"
    margin: float = number(0.0, strict=False)  # chosen must beat rejected by this (plus the data's margin column)
    center_rewards_coefficient: float | None = number(None, strict=False, optional=True)  # pulls scores towards 0


@register_objective
class RewardModel(Pairs):
    name = "reward"
    schema: ClassVar[type] = RewardSchema
    metrics: ClassVar[tuple[str, ...]] = METRICS
    task: ClassVar[str] = "seq_cls"
    task_note: ClassVar[str] = "a sequence classifier with one output (a scalar score)"
    uses_margin: ClassVar[bool] = True

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = scores.float().chunk(2)
        margin = float(self.cfg.margin) + batch.get("margin", torch.zeros((), device=chosen.device))
        loss = -F.logsigmoid(chosen - rejected - margin).mean()
        if self.cfg.center_rewards_coefficient:
            loss = loss + float(self.cfg.center_rewards_coefficient) * ((chosen + rejected) ** 2).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                      "rewards/margins": (chosen - rejected).sum(),
                      "rewards/accuracies": (chosen > rejected).float().sum()}
