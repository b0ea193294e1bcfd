"""Optimizers and learning-rate schedules, built from the ``optimizer`` config group.

Each optimizer is an ``OptimizerSpec`` in ``OPTIMIZERS``: its builder and the config keys it accepts
(anything else is a misspelling and a one-line ConfigError). Schedules come from
``transformers.get_scheduler``. Weight decay never touches biases, norms or other 1-D tensors.

- ``adamw``: torch's AdamW, fused kernel where available. ``sgd``: torch's SGD.
- ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes (``petuner.optim.bnb``).
- ``galore`` / ``galore8bit``: petuner's GaLore (``petuner.optim.galore``) for full fine-tuning.
- ``lora_plus_ratio`` (adamw, sgd, adamw8bit, paged_adamw8bit): LoRA+ (``petuner.optim.groups``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petuner.checks import check_flag, check_number
from petuner.errors import ConfigError
from petuner.optim.groups import NamedParams, galore_groups, param_groups
from petuner.optim.projectors import PROJECTORS

GROUP = "optimizer"
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
COMMON = ("lr", "weight_decay", "schedule", "warmup_steps")
ADAM = (*COMMON, "betas", "eps")
BNB = (*ADAM, "lora_plus_ratio", "min_8bit_size", "embeddings_32bit")
GALORE = (*ADAM, "rank", "update_proj_gap", "scale", "projector", "per_layer")


def _groups(named: NamedParams, cfg: Any) -> list[dict[str, Any]]:
    ratio = cfg.get("lora_plus_ratio")
    return param_groups(named, float(cfg.weight_decay), None if ratio is None else float(cfg.lr) * float(ratio))


def _adamw(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel exists on CUDA (and CPU in recent torch); it gives the same update.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(_groups(named, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def _sgd(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(_groups(named, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adamw8bit(paged: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
        from petuner.optim.bnb import adamw8bit

        return adamw8bit(model, _groups(named, cfg), cfg, paged=paged)

    return build


def _galore(quantize: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, named: NamedParams, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
        from petuner.optim.galore import GaLoreAdamW

        return GaLoreAdamW(galore_groups(model, named, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           quantize=quantize, min_8bit_size=int(cfg.get("min_8bit_size", 0)),
                           per_layer=bool(cfg.per_layer))

    return build


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[[nn.Module, NamedParams, Any, torch.device], torch.optim.Optimizer]
    options: tuple[str, ...]  # config keys besides ``name``


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(_adamw, (*ADAM, "lora_plus_ratio")),
    "sgd": OptimizerSpec(_sgd, (*COMMON, "momentum", "nesterov", "lora_plus_ratio")),
    "adamw8bit": OptimizerSpec(_adamw8bit(paged=False), BNB),
    "paged_adamw8bit": OptimizerSpec(_adamw8bit(paged=True), BNB),
    "galore": OptimizerSpec(_galore(quantize=False), GALORE),
    "galore8bit": OptimizerSpec(_galore(quantize=True), (*GALORE, "min_8bit_size")),
}


# --- validation: one line naming the bad value and what is allowed ------------------------------

def check_optimizer_cfg(cfg: Any) -> None:
    """Check the ``optimizer`` group on its own (keys, types, ranges)."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.name!r}: allowed: {', '.join(OPTIMIZERS)}")
    options = OPTIMIZERS[cfg.name].options
    unknown = sorted(set(cfg.keys()) - {"name", *options})
    if unknown:
        raise ConfigError(f"optimizer.{unknown[0]} is not an option of optimizer={cfg.name}; "
                          f"allowed: {', '.join(options)}")
    missing = [k for k in options if k not in cfg]
    if missing:
        raise ConfigError(f"optimizer.{missing[0]} is missing for optimizer={cfg.name}")
    check_number(cfg, "lr", GROUP)
    check_number(cfg, "weight_decay", GROUP, strict=False)
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={cfg.schedule!r}: allowed: {', '.join(SCHEDULES)}")
    check_number(cfg, "warmup_steps", GROUP, strict=False, integer=True)
    if "betas" in options:
        betas = cfg.betas
        if not (hasattr(betas, "__len__") and len(betas) == 2 and all(
                not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"optimizer.betas={betas!r}: must be two numbers in [0, 1)")
        check_number(cfg, "eps", GROUP, strict=False)
    if "lora_plus_ratio" in options:
        check_number(cfg, "lora_plus_ratio", GROUP, optional=True)
    if "min_8bit_size" in options:
        check_number(cfg, "min_8bit_size", GROUP, strict=False, integer=True)
    if "embeddings_32bit" in options:
        check_flag(cfg, "embeddings_32bit", GROUP)
    if "rank" in options:
        check_number(cfg, "rank", GROUP, low=1, strict=False, integer=True)
        check_number(cfg, "update_proj_gap", GROUP, low=1, strict=False, integer=True)
        check_number(cfg, "scale", GROUP)
        if cfg.projector not in PROJECTORS:
            raise ConfigError(f"optimizer.projector={cfg.projector!r}: allowed: {', '.join(PROJECTORS)}")
        check_flag(cfg, "per_layer", GROUP)
    if "momentum" in options:
        check_number(cfg, "momentum", GROUP, strict=False)
        check_flag(cfg, "nesterov", GROUP)


def check_optimizer_for_trainer(cfg: Any, trainer: Any, compute_dtype: torch.dtype | None) -> None:
    """Combinations of optimizer and trainer settings that cannot work (checked before any weights load)."""
    if not cfg.get("per_layer"):
        return
    if trainer.get("max_grad_norm") is not None:
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

def build_optimizer(model: nn.Module, cfg: Any, device: torch.device,
                    exclude: Collection[str] = ()) -> torch.optim.Optimizer:
    """The main optimizer over every trainable parameter except ``exclude`` (names of parameters a
    method optimizes itself, e.g. SoRA's gates)."""
    named = [(n, p) for n, p in model.named_parameters() if n not in exclude and p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: the adapter left no parameter with requires_grad")
    return OPTIMIZERS[cfg.name].build(model, named, cfg, device)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=int(cfg.warmup_steps),
                         num_training_steps=total_steps)
