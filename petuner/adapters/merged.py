"""``adapter=merged``: LoRA at scale 1 with a rank per target, what ``petuner merge`` writes (and trainable on).

A merge's result is, per layer, factors of its own rank: the stacked factors of ``cat``, peft's factor-level
``linear``/``ties``/``dare_*`` at the inputs' rank, or the exact SVD of a dense combination (DoRA inputs,
``svd``), whose rank can be anything up to the matrix's size. ``ranks`` holds them by full module name (as
peft's ``rank_pattern``); ``r`` is the rank of the targets it does not name. The scale is 1 (``lora_alpha``
equal to each layer's rank), so the stored factors are the update: ΔW = B A.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from petuner.adapters.base import AdapterMethod, AdapterSchema
from petuner.adapters.lora import LoRALinear, check_target_modules
from petuner.adapters.registry import register_adapter
from petuner.adapters.targets import match_targets
from petuner.errors import ConfigError
from petuner.schema import checked, items, number


def check_ranks(cfg: Any, key: str, group: str) -> None:
    bad = {k: v for k, v in dict(cfg.get(key) or {}).items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ConfigError(f"{group}.{key}: each rank must be an integer >= 1; got {bad}")


@dataclass
class MergedSchema(AdapterSchema):
    name: str = "merged"
    r: int = number(8, integer=True)
    target_modules: Any = checked("all-linear", check_target_modules)
    ranks: dict[str, int] = items(dict, check_ranks)  # full module name -> its rank (peft's rank_pattern)


@register_adapter
class Merged(AdapterMethod):
    name = "merged"
    schema: ClassVar[type[AdapterSchema]] = MergedSchema

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        return match_targets(model, self.cfg.target_modules, exclude)

    def make_named_layer(self, name: str, base_layer: nn.Linear) -> LoRALinear:
        r = int(self.cfg.ranks.get(name, self.cfg.r))
        return LoRALinear(base_layer, r=r, alpha=float(r))

    def peft_options(self) -> dict[str, Any]:
        return {}  # plain LoRA; the export fits r, lora_alpha and the patterns to the factors
