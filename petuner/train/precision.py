"""Dtypes of a run: which combinations of weights, adapters and autocast can train, and what run.json says.

Adapters train in ``model.adapter_dtype`` (fp32) over weights in ``model.dtype``; ``trainer.precision``
picks the autocast dtype. Combinations that cannot train are refused before the weights load.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from petuner.errors import ConfigError
from petuner.models import DTYPES, adapter_dtype

__all__ = ["adapter_dtype", "check_precision", "dtype_report", "upcast_trainable"]

log = logging.getLogger(__name__)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def full_finetuning(method: Any) -> bool:
    """``adapter=none``: the base weights themselves train (no adapter holds the update)."""
    return method.name == "none"


def check_precision(model_cfg: DictConfig, method: Any, compute_dtype: torch.dtype | None) -> None:
    """Dtype combinations that cannot train, refused before the weights load; pure low-precision full
    fine-tuning trains, with a warning."""
    weights, adapters = DTYPES[model_cfg.dtype], adapter_dtype(model_cfg)
    full = full_finetuning(method)
    if compute_dtype == torch.float16 and torch.float16 in (weights if full else None, adapters):
        what = "model.dtype=float16 with full fine-tuning" if full else "model.adapter_dtype=float16"
        raise ConfigError(f"{what} under fp16 autocast: the gradient scaler cannot unscale fp16 gradients; "
                          "use model.adapter_dtype=float32" + (" (or model.dtype=float32)" if full else "")
                          + ", or trainer.precision=bf16/fp32")
    if method.name == "peft" and adapters != torch.float32:
        raise ConfigError(f"model.adapter_dtype={model_cfg.adapter_dtype}: adapter=peft keeps peft's fp32 adapter "
                          "weights (its autocast_adapter_dtype); allowed: float32")
    if full and weights != torch.float32:
        log.warning("full fine-tuning with model.dtype=%s trains the %s weights in place: updates below its "
                    "resolution (%.1g of a weight) are lost. For fp32 master weights use model.dtype=float32 "
                    "with trainer.precision=%s (autocast)", model_cfg.dtype, model_cfg.dtype,
                    torch.finfo(weights).eps, "bf16" if weights == torch.bfloat16 else "fp16")


def upcast_trainable(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Trainable base parameters of an adapter run (task heads, biases) in ``dtype`` too."""
    for p in model.parameters():
        if p.requires_grad and dtype is not None and p.is_floating_point():
            p.data = p.data.to(dtype)


def dtype_report(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> dict[str, Any]:
    """run.json's record of the real dtypes: parameters trained and frozen (numbers of values per dtype),
    and the dtype the base's matrix products run in (autocast's, else the frozen weights')."""
    counts: dict[str, dict[str, int]] = {"trainable": {}, "frozen": {}}
    for p in model.parameters():
        kind = counts["trainable" if p.requires_grad else "frozen"]
        kind[_name(p.dtype)] = kind.get(_name(p.dtype), 0) + p.numel()
    frozen = max(counts["frozen"], key=counts["frozen"].get) if counts["frozen"] else None
    compute = _name(compute_dtype) if compute_dtype is not None else frozen or "float32"
    return {"parameter_dtypes": counts, "autocast_dtype": _name(compute_dtype) if compute_dtype else None,
            "compute_dtype": compute}
