"""Target selection with peft's semantics: a list matches module names by suffix, a string is a regex,
"all-linear" is every linear layer but the output layer, "auto" the family's default (``petuner.families``).

Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's x @ W + b, W stored in × out):
``petuner.adapters.conv1d`` turns a targeted Conv1D into the equivalent ``nn.Linear`` for the adapter
and back when the adapter is unloaded, so every method sees one layout."""

from __future__ import annotations

import re
from collections.abc import Sequence

from omegaconf import ListConfig
from torch import nn

from petuner.adapters.conv1d import is_linear, linear_shape
from petuner.errors import ConfigError


def linear_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear(module) and not _under(name, exclude)]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def output_layer_names(model: nn.Module) -> list[str]:
    """The output projection (e.g. lm_head), never adapted by "all-linear"."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [name for name, module in model.named_modules() if out is not None and module is out]


def match_targets(model: nn.Module, spec: str | Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Resolve ``target_modules`` to module names, as peft does; a spec matching nothing is an error."""
    if isinstance(spec, ListConfig):
        spec = list(spec)
    if spec == "auto":
        from petuner.families import default_targets

        spec = default_targets(getattr(getattr(model, "config", None), "model_type", None))
    candidates = linear_names(model, exclude)
    if spec == "all-linear":
        skip = output_layer_names(model)
        found = [n for n in candidates if n not in skip]
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ConfigError(f"adapter.target_modules={spec!r} is not a valid regex ({err})") from None
        found = [n for n in candidates if pattern.fullmatch(n)]
    else:
        keys = [str(k) for k in spec]
        found = [n for n in candidates if any(n == k or n.endswith("." + k) for k in keys)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        hint = "" if spec == "all-linear" else " (or use \"all-linear\" or a regex)"
        raise ConfigError(f"adapter.target_modules={spec!r} matches no linear layer in "
                          f"{type(model).__name__}; its linear layers are named: {', '.join(leaves) or 'none'}{hint}")
    return found


def match_parameters(model: nn.Module, spec: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """peft's ``target_parameters``: parameter names matched by suffix (the fused expert weights of a
    mixture of experts, e.g. ``experts.gate_up_proj``, which no linear layer holds)."""
    keys = [str(k) for k in spec]
    found = [name for name, _ in model.named_parameters()
             if any(name == k or name.endswith("." + k) for k in keys) and not _under(name, exclude)]
    if not found:
        fused = sorted({n.split(".", 3)[-1] for n, p in model.named_parameters() if p.dim() == 3})
        raise ConfigError(f"adapter.config.target_parameters={keys!r} matches no parameter of {type(model).__name__}"
                          f"; its 3-D (expert) parameters are: {', '.join(fused) or 'none'}")
    return found


def check_rank_fits(model: nn.Module, targets: Sequence[str], r: int) -> None:
    for name in targets:
        out_features, in_features = linear_shape(model.get_submodule(name))
        limit = min(in_features, out_features)
        if r > limit:
            raise ConfigError(f"adapter.r={r} exceeds the size of {name} ({out_features}×{in_features}); "
                              f"allowed: 1..{limit}")
