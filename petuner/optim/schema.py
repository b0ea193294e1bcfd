"""The ``optimizer`` group's schemas, one per optimizer (``conf/optimizer/<name>.yaml`` names
``<name>_schema``); optimizers that share options inherit them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petuner.errors import ConfigError
from petuner.optim.projectors import PROJECTORS
from petuner.schema import choice, flag, items, number

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def check_betas(cfg: Any, key: str, group: str) -> None:
    betas = cfg.get(key)
    if not (hasattr(betas, "__len__") and len(betas) == 2 and all(
            not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{group}.{key}={betas!r}: must be two numbers in [0, 1)")


@dataclass
class OptimizerSchema:
    """What every optimizer takes."""

    name: str = ""
    lr: float = number(2.0e-4)
    weight_decay: float = number(0.0, strict=False)
    schedule: str = choice("cosine", tuple(SCHEDULES))  # all after linear warmup
    warmup_steps: int = number(10, strict=False, integer=True)
    head_lr: float | None = number(None, optional=True)  # a fresh task head's lr (seq_cls); null: lr


@dataclass
class SGDSchema(OptimizerSchema):
    momentum: float = number(0.9, strict=False)
    nesterov: bool = flag(False)
    lora_plus_ratio: float | None = number(None, optional=True)  # LoRA+: B's lr = ratio × lr


@dataclass
class AdamSchema(OptimizerSchema):
    betas: list[float] = items(lambda: [0.9, 0.999], check_betas)
    eps: float = number(1.0e-8, strict=False)


@dataclass
class AdamWSchema(AdamSchema):
    lora_plus_ratio: float | None = number(None, optional=True)  # LoRA+: B's lr = ratio × lr


@dataclass
class AdamW8bitSchema(AdamWSchema):
    min_8bit_size: int = number(4096, strict=False, integer=True)  # smaller tensors keep fp32 state
    embeddings_32bit: bool = flag(True)  # fp32 state for nn.Embedding weights


@dataclass
class GaLoreSchema(AdamSchema):
    rank: int = number(128, low=1, strict=False, integer=True)  # projected rank
    update_proj_gap: int = number(200, low=1, strict=False, integer=True)  # steps between projector refreshes
    scale: float = number(0.25)  # the projected-back update is multiplied by it
    projector: str = choice("svd", tuple(PROJECTORS))
    per_layer: bool = flag(False)  # update each weight in its backward hook (needs max_grad_norm=null)


@dataclass
class GaLore8bitSchema(GaLoreSchema):
    min_8bit_size: int = number(4096, strict=False, integer=True)  # smaller moments stay fp32
