"""The one registry of adapter methods: ``adapter.name`` in the config picks an entry here.

Every module in ``petuner/adapters/`` is imported on first lookup, so a new method is one new file
that decorates its ``AdapterMethod`` with ``@register_adapter`` (plus its YAML in conf/adapter/).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from petuner.adapters.base import AdapterMethod
from petuner.errors import ConfigError

_REGISTRY: dict[str, type[AdapterMethod]] = {}
_INFRASTRUCTURE = {"base", "registry", "inject", "capabilities", "targets", "peft_form"}


def register_adapter(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"adapter name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import petuner.adapters as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{package.__name__}.{info.name}")


def adapter_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_adapter_class(name: str) -> type[AdapterMethod]:
    names = adapter_names()
    if name not in _REGISTRY:
        raise ConfigError(f"adapter={name!r} is not a registered adapter; allowed: {', '.join(names)}")
    return _REGISTRY[name]


def build_adapter(cfg: Any) -> AdapterMethod:
    """Instantiate (and validate) the method named by ``cfg.name``."""
    return get_adapter_class(str(cfg["name"]))(cfg)
