"""``trainer.strategy=fsdp``: a base model too large for one device, sharded over the processes with FSDP2.

torch's ``fully_shard`` makes one unit per decoder layer (``blocks.decoder_layers``: the classes a transformers
model names in ``_no_split_modules``) plus the root; parameters become DTensors holding each rank's shard and are
gathered for each unit's forward and backward. Frozen base weights and trainable adapter weights share
units (FSDP2 allows mixed ``requires_grad``); a mixed-precision policy computes in the run's precision
and reduces gradients in fp32. What leaves the processes (checkpoints, the final adapter, exports) is
gathered to full tensors first; optimizer state goes through torch.distributed.checkpoint's full state
dict helpers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from petuner.errors import ConfigError
from petuner.train.blocks import decoder_layers

# Verified under FSDP on CPU (gloo), SFT and DPO: tests/test_distributed.py. Others are refused rather than guessed at:
# quantized bases store packed integer weights FSDP cannot shard (QLoRA over FSDP needs bitsandbytes'
# quant_storage: a stretch goal), and the rest are untested.
ADAPTERS = ("lora", "none")
OPTIMIZERS = ("adamw", "sgd")


def check(cfg: Any) -> None:
    """Refuse, from the run config, what FSDP does not shard (or was not verified sharded)."""
    adapter, optimizer = cfg.adapter.name, cfg.optimizer.name
    if adapter not in ADAPTERS:
        raise ConfigError(f"trainer.strategy=fsdp cannot shard adapter={adapter}: allowed with fsdp: "
                          f"{', '.join(ADAPTERS)} (or use trainer.strategy=ddp)")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"trainer.strategy=fsdp with optimizer={optimizer}: allowed with fsdp: "
                          f"{', '.join(OPTIMIZERS)} (GaLore and 8-bit states need whole, unsharded matrices)")


def regather(model: nn.Module) -> None:
    """Free the root unit's gathered weights (FSDP2 keeps the root's gathered after a forward, and its
    parameters are then the gathered tensors): every parameter is its shard again, and the next forward
    gathers the shards as they are now, after values were copied into them."""
    if is_sharded(model):
        model.reshard()


def laid_out_as(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (the same on every rank) as this rank's shard of ``param``'s layout, or as it is where
    ``param`` is not sharded. No collective: each rank cuts its own part."""
    if isinstance(param, DTensor) and not isinstance(tensor, DTensor):
        return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
    return tensor


def shard(model: nn.Module, compute_dtype: torch.dtype | None) -> nn.Module:
    """Shard ``model`` in place: one FSDP unit per decoder layer, then the root (embeddings, head)."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in decoder_layers(model):
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from sharded ones (a collective: every rank calls it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
         optimizer_state_dict: dict[str, Any]) -> None:
    """Load full adapter weights and optimizer state (read by every rank) into this rank's shards."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state_dict, options=options)
