"""``adapter=none``: full fine-tuning. No layer is wrapped; every base parameter trains."""

from __future__ import annotations

from petuner.adapters.base import AdapterMethod
from petuner.adapters.registry import register_adapter


@register_adapter
class FullFineTuning(AdapterMethod):
    name = "none"

    def trains_base_model(self) -> bool:
        return True
