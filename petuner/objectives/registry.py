"""The one registry of training objectives: ``loss.name`` in the config picks an entry here.

Every module in ``petuner/objectives/`` is imported on first lookup, so a new objective is one new file
that decorates its class with ``@register_objective`` (plus its YAML in conf/loss/).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from petuner.errors import ConfigError

_REGISTRY: dict[str, type] = {}
_INFRASTRUCTURE = {"registry", "pairs", "reference", "schema"}


def register_objective(cls: type) -> type:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"objective name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import petuner.objectives as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{package.__name__}.{info.name}")


def objective_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_objective_class(name: str) -> type:
    names = objective_names()
    if name not in _REGISTRY:
        raise ConfigError(f"loss={name!r} is not a registered objective; allowed: {', '.join(names)}")
    return _REGISTRY[name]


def build_objective(cfg: Any) -> Any:
    """Instantiate (and validate) the objective named by ``cfg.name``."""
    return get_objective_class(str(cfg["name"]))(cfg)
