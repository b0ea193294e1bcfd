"""Parameter groups: weight decay never on biases, norms or other 1-D tensors; LoRA+'s faster B; a
task head's own learning rate; GaLore's projected matrices.

LoRA+ (Hayou et al., 2024) trains each LoRA B (parameters named ``*.lora_B.*``, peft's layout, which
every LoRA-type petuner adapter follows) with ``lora_plus_ratio`` × the learning rate of the rest.
The schedule multiplies every group's initial lr by the same factor, so the ratio holds all run long.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from petuner.errors import ConfigError

ParamGroups = list[dict[str, Any]]
NamedParams = Sequence[tuple[str, nn.Parameter]]
LORA_B = ".lora_B."


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lora_plus_lr: float | None = None, head_lr: float | None = None,
                 heads: Sequence[str] = ()) -> ParamGroups:
    """decay (≥2-D) and no-decay (1-D) groups; with ``lora_plus_lr``, LoRA B matrices get their own
    groups at that learning rate, and with ``head_lr`` the parameters of the ``heads`` modules."""
    kinds = ("base", "lora_b", "head")
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {(k, d): [] for k in kinds for d in (True, False)}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if head_lr is not None and any(name.startswith(h + ".") for h in heads):
            kind = "head"
        else:
            kind = "lora_b" if lora_plus_lr is not None and LORA_B in f".{name}." else "base"
        buckets[kind, p.ndim >= 2].append(p)
    if lora_plus_lr is not None and not (buckets["lora_b", True] or buckets["lora_b", False]):
        raise ConfigError(f"optimizer.lora_plus_ratio is set but no trainable parameter is a LoRA B (named "
                          f"*{LORA_B}*); LoRA+ needs a LoRA-type adapter, or set optimizer.lora_plus_ratio=null")
    lrs = {"base": None, "lora_b": lora_plus_lr, "head": head_lr}
    groups = [{"params": buckets[k, d], "weight_decay": weight_decay if d else 0.0, "lr": lrs[k]}
              for k in kinds for d in (True, False)]
    return [{k: v for k, v in g.items() if v is not None} for g in groups if g["params"]]


def galore_matrices(model: nn.Module, named_params: NamedParams, rank: int) -> list[str]:
    """Names of the trainable parameters GaLore projects: weights of ``nn.Linear`` layers other than the
    output layer whose smaller side exceeds ``rank`` (at or below it a projection saves nothing).
    Embeddings, the output layer, norms and biases stay plain AdamW, as in the paper."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not output}
    candidates = [(n, p) for n, p in named_params if p.requires_grad and id(p) in linear_weights]
    chosen = [n for n, p in candidates if min(p.shape) > rank]
    if not chosen:
        largest = max((min(p.shape) for _, p in candidates), default=0)
        raise ConfigError(f"optimizer.rank={rank} leaves GaLore nothing to project: it must be below the smaller "
                          f"side of a trainable linear weight (largest here: {largest}); lower optimizer.rank "
                          "(GaLore is meant for adapter=none)")
    return chosen


def galore_groups(model: nn.Module, named_params: NamedParams, cfg: Any, heads: Sequence[str] = ()) -> ParamGroups:
    """GaLore's projected matrices (decayed), then the plain decay and no-decay groups."""
    chosen = set(galore_matrices(model, named_params, int(cfg.rank)))
    projected = {"params": [p for n, p in named_params if n in chosen], "weight_decay": float(cfg.weight_decay),
                 "rank": int(cfg.rank), "update_proj_gap": int(cfg.update_proj_gap), "scale": float(cfg.scale),
                 "projector": str(cfg.projector)}
    rest = param_groups([(n, p) for n, p in named_params if n not in chosen], float(cfg.weight_decay),
                        head_lr=cfg.head_lr, heads=heads)
    return [projected, *rest]
