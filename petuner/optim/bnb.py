"""bitsandbytes' 8-bit AdamW (block-wise quantized moments; Dettmers et al., ICLR 2022), plain or paged.

bitsandbytes keeps fp32 state for tensors under ``min_8bit_size`` elements. With
``embeddings_32bit`` (the paper's "stable embedding" advice, also what transformers' Trainer does)
every ``nn.Embedding`` weight keeps fp32 state too, through bitsandbytes' own ``override_config``, on
a manager private to this optimizer: the global one is keyed by ``id(param)`` and would leak into
later optimizers in the same process. Paged optimizers page their state to host memory under GPU
memory pressure (CUDA only; on CPU bitsandbytes falls back to the plain optimizer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petuner.optim.groups import ParamGroups


def adamw8bit(model: nn.Module, groups: ParamGroups, cfg: Any, paged: bool) -> torch.optim.Optimizer:
    import bitsandbytes as bnb
    from bitsandbytes.optim.optimizer import GlobalOptimManager

    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    optimizer = cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, min_8bit_size=int(cfg.min_8bit_size))
    manager = GlobalOptimManager.__new__(GlobalOptimManager)
    manager.initialize()
    if cfg.embeddings_32bit:
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                manager.override_config(module.weight, "optim_bits", 32)
    optimizer.mng = manager
    return optimizer
