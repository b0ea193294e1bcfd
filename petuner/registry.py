"""A registry of named classes, filled by a decorator: what ``adapter.name`` and ``loss.name`` pick from.

Every module of the registry's package is imported on first lookup, so a new entry is one new file whose class
is decorated with the registry's ``register`` (plus its YAML in the config group).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any

from petuner.errors import ConfigError


class Registry:
    def __init__(self, package: str, key: str, noun: str, infrastructure: Iterable[str]) -> None:
        self.package, self.key, self.noun = package, key, noun  # key: the config group; noun: what it names
        self.infrastructure = set(infrastructure)  # the package's modules that register nothing
        self.classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        if cls.name in self.classes and self.classes[cls.name] is not cls:
            raise ValueError(f"{self.noun} name {cls.name!r} registered twice")
        self.classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in self.infrastructure:
                importlib.import_module(f"{self.package}.{info.name}")
        return sorted(self.classes)

    def get(self, name: str) -> type:
        names = self.names()
        if name not in self.classes:
            raise ConfigError(f"{self.key}={name!r} is not a registered {self.noun}; allowed: {', '.join(names)}")
        return self.classes[name]

    def build(self, cfg: Any) -> Any:
        """Instantiate (and validate) the entry named by ``cfg.name``."""
        return self.get(str(cfg["name"]))(cfg)
