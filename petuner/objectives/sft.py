"""``loss=sft``: the model's own loss, next-token cross entropy on the labelled tokens (or a classifier's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from petuner.objectives.registry import register_objective
from petuner.objectives.schema import ObjectiveSchema, RegisteredObjective


@dataclass
class SFTSchema(ObjectiveSchema):
    name: str = "sft"


@register_objective
class SFT(RegisteredObjective):
    name = "sft"
    schema: ClassVar[type] = SFTSchema
