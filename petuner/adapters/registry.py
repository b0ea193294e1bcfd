"""The one registry of adapter methods: ``adapter.name`` in the config picks an entry here.

Every module in ``petuner/adapters/`` is imported on first lookup, so a new method is one new file
that decorates its ``AdapterMethod`` with ``@register_adapter`` (plus its YAML in conf/adapter/).
"""

from __future__ import annotations

from typing import Any

from petuner.adapters.base import AdapterMethod
from petuner.registry import Registry

ADAPTERS = Registry("petuner.adapters", "adapter", "adapter",
                    infrastructure={"base", "registry", "inject", "capabilities", "targets", "peft_form"})
register_adapter = ADAPTERS.register
adapter_names = ADAPTERS.names


def get_adapter_class(name: str) -> type[AdapterMethod]:
    return ADAPTERS.get(name)


def build_adapter(cfg: Any) -> AdapterMethod:
    """Instantiate (and validate) the method named by ``cfg.name``."""
    return ADAPTERS.build(cfg)
