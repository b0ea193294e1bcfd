"""Optimizers and learning-rate schedules, built from the ``optimizer`` config group.

Each optimizer is a builder in ``OPTIMIZERS``; schedules come from ``transformers.get_scheduler``.
Parameters are grouped so that weight decay never touches biases, norms or other 1-D tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from petuner.errors import ConfigError

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
ParamGroups = list[dict[str, Any]]


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> ParamGroups:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(groups: ParamGroups, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel exists on CUDA (and CPU in recent torch); it gives the same update.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def _sgd(groups: ParamGroups, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


OPTIMIZERS: dict[str, Callable[[ParamGroups, Any, torch.device], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}


def check_optimizer_cfg(cfg: Any) -> None:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.name!r}: allowed: {', '.join(OPTIMIZERS)}")
    for key in ("lr", "weight_decay"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                (key == "lr" and value == 0):
            raise ConfigError(f"optimizer.{key}={value!r}: must be a number {'> 0' if key == 'lr' else '>= 0'}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={cfg.schedule!r}: allowed: {', '.join(SCHEDULES)}")
    if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={cfg.warmup_steps!r}: must be an integer >= 0")


def build_optimizer(model: nn.Module, cfg: Any, device: torch.device,
                    exclude: Collection[str] = ()) -> torch.optim.Optimizer:
    """The main optimizer over every trainable parameter except ``exclude`` (names of parameters a
    method optimizes itself, e.g. SoRA's gates)."""
    named = [(n, p) for n, p in model.named_parameters() if n not in exclude]
    groups = param_groups(named, float(cfg.weight_decay))
    if not groups:
        raise ConfigError("nothing to train: the adapter left no parameter with requires_grad")
    return OPTIMIZERS[cfg.name](groups, cfg, device)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=int(cfg.warmup_steps),
                         num_training_steps=total_steps)
