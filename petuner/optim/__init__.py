"""Optimizers and learning-rate schedules, built from the ``optimizer`` config group.

Each optimizer is an ``OptimizerSpec`` in ``OPTIMIZERS``: its builder and its schema (the dataclass of
its options, in ``petuner.optim.schema``; anything else is a misspelling and a one-line ConfigError).
Schedules come from ``transformers.get_scheduler``. Weight decay never touches biases, norms or other 1-D tensors.

- ``adamw``: torch's AdamW, fused kernel where available. ``sgd``: torch's SGD.
- ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes (``petuner.optim.bnb``).
- ``galore`` / ``galore8bit``: petuner's GaLore (``petuner.optim.galore``) for full fine-tuning.
- ``lora_plus_ratio`` (adamw, sgd, adamw8bit, paged_adamw8bit): LoRA+ (``petuner.optim.groups``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from petuner.errors import ConfigError
from petuner.optim.groups import NamedParams, galore_groups, param_groups
from petuner.optim.schema import (
    SCHEDULES,
    AdamW8bitSchema,
    AdamWSchema,
    GaLore8bitSchema,
    GaLoreSchema,
    OptimizerSchema,
    SGDSchema,
)
from petuner.schema import conform


def _groups(named: NamedParams, cfg: Any, heads: Sequence[str]) -> list[dict[str, Any]]:
    ratio = cfg.lora_plus_ratio
    return param_groups(named, float(cfg.weight_decay), None if ratio is None else float(cfg.lr) * float(ratio),
                        head_lr=cfg.head_lr, heads=heads)


def _adamw(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device,
           heads: Sequence[str]) -> torch.optim.Optimizer:
    # The fused kernel exists on CUDA (and CPU in recent torch); it gives the same update.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(_groups(named, cfg, heads), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused)


def _sgd(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device,
         heads: Sequence[str]) -> torch.optim.Optimizer:
    return torch.optim.SGD(_groups(named, cfg, heads), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adamw8bit(paged: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device,
              heads: Sequence[str]) -> torch.optim.Optimizer:
        from petuner.optim.bnb import adamw8bit

        return adamw8bit(model, _groups(named, cfg, heads), cfg, paged=paged)

    return build


def _galore(quantize: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device,
              heads: Sequence[str]) -> torch.optim.Optimizer:
        from petuner.optim.galore import GaLoreAdamW

        return GaLoreAdamW(galore_groups(model, named, cfg, heads), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           quantize=quantize, min_8bit_size=int(cfg.min_8bit_size) if quantize else 0,
                           per_layer=bool(cfg.per_layer))

    return build


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[[nn.Module, NamedParams, Any, torch.device, Sequence[str]], torch.optim.Optimizer]
    schema: type[OptimizerSchema]


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(_adamw, AdamWSchema),
    "sgd": OptimizerSpec(_sgd, SGDSchema),
    "adamw8bit": OptimizerSpec(_adamw8bit(paged=False), AdamW8bitSchema),
    "paged_adamw8bit": OptimizerSpec(_adamw8bit(paged=True), AdamW8bitSchema),
    "galore": OptimizerSpec(_galore(quantize=False), GaLoreSchema),
    "galore8bit": OptimizerSpec(_galore(quantize=True), GaLore8bitSchema),
}


# --- validation: one line naming the bad value and what is allowed ------------------------------

def optimizer_schema(name: str) -> type[OptimizerSchema]:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r}: allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name].schema


def check_optimizer_cfg(cfg: Any) -> DictConfig:
    """The ``optimizer`` group checked against its optimizer's schema (keys, types, ranges)."""
    name = str(cfg["name"])
    return conform(optimizer_schema(name), cfg, "optimizer", f"optimizer={name}")


def check_optimizer_for_trainer(cfg: Any, trainer: Any, compute_dtype: torch.dtype | None) -> None:
    """Combinations of optimizer and trainer settings that cannot work (checked before any weights load)."""
    if not cfg.get("per_layer"):  # only GaLore has it
        return
    if trainer.max_grad_norm is not None:
        raise ConfigError(f"optimizer.per_layer=true updates each weight during backward, before a global "
                          f"gradient norm exists, so trainer.max_grad_norm={trainer.max_grad_norm!r} cannot "
                          "clip; set trainer.max_grad_norm=null (or optimizer.per_layer=false)")
    if trainer.grad_accum != 1:
        raise ConfigError(f"optimizer.per_layer=true steps on every backward, so trainer.grad_accum="
                          f"{trainer.grad_accum!r} cannot accumulate; set trainer.grad_accum=1")
    if compute_dtype == torch.float16:
        raise ConfigError("optimizer.per_layer=true needs unscaled gradients during backward; fp16 loss scaling "
                          "cannot provide them: use trainer.precision=bf16 or fp32")


# --- building --------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, cfg: Any, device: torch.device, exclude: Collection[str] = (),
                    heads: Sequence[str] = ()) -> torch.optim.Optimizer:
    """The main optimizer over every trainable parameter except ``exclude`` (names of parameters a
    method optimizes itself, e.g. SoRA's gates); the ``heads`` modules train at ``optimizer.head_lr``."""
    cfg = check_optimizer_cfg(cfg)  # a config built in code gets its schema's defaults
    named = [(n, p) for n, p in model.named_parameters() if n not in exclude and p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: the adapter left no parameter with requires_grad")
    return OPTIMIZERS[cfg.name].build(model, named, cfg, device, heads)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=int(cfg.warmup_steps),
                         num_training_steps=total_steps)
