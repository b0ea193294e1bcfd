"""One run over many processes (torchrun): the few collective questions the rest of petuner asks.

"Am I the writer", "sum this over ranks", "does any rank want this", "wait for the others", "which
part of this global batch is mine", "wrap the model for data parallel": each is a function here, and
each is a no-op (or the identity) in a single process, so the loop and ``run`` read the same either way.

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
with one backend per device type: gloo for CPU tensors, NCCL for CUDA tensors (one GPU per process,
``LOCAL_RANK``). Nothing here is written by hand that torch.distributed already does: this module only
picks, per call, the tensor's device and the no-op for one process.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from petuner.errors import ConfigError
from petuner.train import fsdp

STRATEGIES = ("ddp", "fsdp")
RUN_TIME_ENV = "PETUNER_RUN_TIME"  # read by conf/config.yaml: every rank names the same default run folder


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the launcher's process group (idempotent); share rank 0's start time for the run folder name."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    os.environ[RUN_TIME_ENV] = broadcast_object(time.strftime("%Y-%m-%d_%H-%M-%S"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_writer() -> bool:
    """Rank 0 alone writes the run folder, metrics, progress bar and exports."""
    return rank() == 0


def seed_rank(seed: int) -> None:
    """Give every rank but 0 its own random stream (dropout) once everything all ranks must draw alike
    (adapter initialisation, DyLoRA's rank generator) is drawn; rank 0 keeps the single-process stream."""
    if rank() > 0:
        random.seed(seed + rank())
        torch.manual_seed(seed + rank())


def barrier() -> None:
    if active():
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all ranks (a new tensor; the input in a single process)."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise: did any rank raise this flag. One decision, the same on every rank."""
    return sum_over_ranks(flags.to(torch.int32)) > 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj``, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def writer_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling a cache); the others run it after, and find it filled."""
    if not is_writer():
        barrier()
    yield
    if is_writer():
        barrier()


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    parts = torch.tensor_split(torch.tensor(list(indices), dtype=torch.long), world_size())
    return parts[rank()].tolist()


def whole_batches(batches: list[list[int]]) -> list[list[int]]:
    """Global batches every rank gets a share of: an epoch's last batch with fewer examples than ranks is
    dropped (never in one process), since a rank with nothing to forward would stall the others."""
    return [b for b in batches if len(b) >= world_size()]


def check_launch(cfg: Any) -> None:
    """Reject, in one line and before any loading, what cannot run under this launch."""
    strategy, optimizer_cfg = cfg.trainer.strategy, cfg.optimizer
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r}: allowed: {', '.join(STRATEGIES)}")
    if strategy == "fsdp":
        fsdp.check(cfg)
    if strategy == "fsdp" and not active():
        raise ConfigError("trainer.strategy=fsdp shards the model over processes, but this run has no process "
                          "group: launch it with torchrun --nproc_per_node=N (N >= 2), or use strategy=ddp")
    if active() and optimizer_cfg.get("per_layer"):
        raise ConfigError("optimizer.per_layer=true steps each weight inside backward, before gradients are "
                          "averaged over processes: with torchrun use optimizer.per_layer=false")


def wrap(model: nn.Module, device: torch.device, strategy: str = "ddp",
         compute_dtype: torch.dtype | None = None) -> nn.Module:
    """The module to train: DistributedDataParallel over the trainable (adapter) parameters, or the model
    itself in one process; evaluation, saving and hooks keep using the unwrapped model. With FSDP the
    model itself is sharded in place (before the optimizer is built: its parameters become shards)."""
    if not active():
        return model
    if strategy == "fsdp":
        return fsdp.shard(model, compute_dtype)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce on every micro-batch of an accumulation but the last."""
    if fsdp.is_sharded(model):
        model.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def eval_share(model: nn.Module, size: int) -> tuple[list[int], bool]:
    """This rank's held-out examples, and whether its sums must be added over ranks. A sharded model
    gathers its weights in every forward, a collective: there every rank evaluates everything."""
    if fsdp.is_sharded(model):
        return list(range(size)), False
    return shard(range(size)), True


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors to save, from sharded parameters (every rank must call it); the identity otherwise."""
    return fsdp.full(tensors)
