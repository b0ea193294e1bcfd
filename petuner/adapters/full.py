"""``adapter=none``: full fine-tuning. No layer is wrapped; every base parameter trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from petuner.adapters.base import AdapterMethod, AdapterSchema
from petuner.adapters.registry import register_adapter


@dataclass
class FullSchema(AdapterSchema):
    name: str = "none"


@register_adapter
class FullFineTuning(AdapterMethod):
    name = "none"
    schema: ClassVar[type[AdapterSchema]] = FullSchema

    def trains_base_model(self) -> bool:
        return True
