"""Exact byte accounting of what training holds: parameters, gradients, optimizer state.

Counts are of distinct storages (tied weights, and state tensors shared between parameters such
as bitsandbytes' quantization maps, count once), with every tensor's real dtype: 8-bit states count
their uint8 codes plus their fp32 absmax blocks. Optimizers that hold tensors outside ``state``
(GaLore's cached DCT bases) list them in ``extra_state_tensors()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from petuner.train import fsdp
from petuner.train.hooks import Hook, TrainState

log = logging.getLogger(__name__)
MIB = 2 ** 20


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in map(fsdp.local, tensors):  # a sharded tensor: this rank's shard
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    extra = getattr(optimizer, "extra_state_tensors", list)()
    return storage_bytes([*_tensors(list(optimizer.state.values())), *extra])


def gradient_bytes(model: nn.Module) -> int:
    return storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


class MemoryHook(Hook):
    """Records the gradient bytes held when the optimizer steps (the largest over the run)."""

    def __init__(self) -> None:
        self.grad_bytes = 0

    def after_backward(self, state: TrainState) -> None:
        self.grad_bytes = max(self.grad_bytes, gradient_bytes(state.model))

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The memory metrics of a finished run; also logged as one line."""
        report = {"memory/param_bytes": float(storage_bytes(model.parameters())),
                  "memory/trainable_param_bytes": float(storage_bytes(p for p in model.parameters()
                                                                      if p.requires_grad)),
                  "memory/grad_bytes": float(self.grad_bytes),
                  "memory/optimizer_state_bytes": float(optimizer_state_bytes(optimizer))}
        log.info("memory: parameters %.1f MiB (trainable %.1f), gradients %.1f MiB, optimizer state %.1f MiB",
                 *(report[k] / MIB for k in ("memory/param_bytes", "memory/trainable_param_bytes",
                                             "memory/grad_bytes", "memory/optimizer_state_bytes")))
        return report

    def state_dict(self) -> dict[str, Any]:
        return {"grad_bytes": self.grad_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_bytes = int(state["grad_bytes"])
