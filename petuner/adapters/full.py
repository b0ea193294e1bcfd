"""``adapter=none``: full fine-tuning. No layer is wrapped; every base parameter trains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from petuner.adapters.base import AdapterMethod, AdapterSchema, Injection
from petuner.adapters.registry import register_adapter


@dataclass
class FullSchema(AdapterSchema):
    name: str = "none"


@register_adapter
class FullFineTuning(AdapterMethod):
    name = "none"
    schema: ClassVar[type[AdapterSchema]] = FullSchema

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        model.requires_grad_(True)
        return Injection(targets=[], head_modules=list(head_modules))
