"""Device, precision and memory: the loop's only GPU-aware corner.

``precision=auto`` picks bf16 autocast on CUDA devices that support it, fp16 (with a gradient
scaler) on older CUDA devices, and fp32 elsewhere: bf16 autocast on CPU is ~20× slower than fp32.
``bf16`` and ``fp16`` force that autocast on any device (``fp16`` on CPU drives
``torch.amp.GradScaler("cpu")``: slow, but the GPU's fp16 path runs and is tested there).
Weights stay in their storage dtype (``model.dtype``); autocast only changes the compute dtype.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

import torch

from petuner.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():  # under torchrun: this process's GPU (LOCAL_RANK, set at launch)
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"trainer.device={spec!r}: allowed: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={spec!r} but no CUDA device is available; use auto or cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if spec not in PRECISIONS:
        raise ConfigError(f"trainer.precision={spec!r}: allowed: auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[spec]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A real scaler for fp16 (its range needs it), a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory in bytes: the CUDA allocator's on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"memory/peak_bytes": float(torch.cuda.max_memory_allocated(device)),
                "memory/peak_reserved_bytes": float(torch.cuda.max_memory_reserved(device))}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory/peak_rss_bytes": float(peak if sys.platform == "darwin" else peak * 1024)}
