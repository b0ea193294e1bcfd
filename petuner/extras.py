"""Optional features and the pip extra that brings each: one place that says ``pip install 'petuner[X]'``.

The core install is what every run needs. A feature beyond it (a logger, a sweeper or launcher, GGUF, plots,
the web page) is checked here before any work starts, and a missing package is one line naming the extra.
Packages are looked up with ``importlib.util.find_spec`` (nothing is imported; a module set to ``None`` in
``sys.modules`` counts as missing, as Python's import system treats it).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petuner.errors import ConfigError

# feature → (the module it imports, the extra that installs it)
FEATURES: dict[str, tuple[str, str]] = {
    "logger=tensorboard": ("tensorboard", "tensorboard"),
    "logger=mlflow": ("mlflow", "mlflow"),
    "GGUF export": ("gguf", "gguf"),
    "plots": ("matplotlib", "plots"),
    "web page": ("gradio", "ui"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
}


def installed(module: str) -> bool:
    """True if ``module`` can be imported (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or set to None
        return False


def require(feature: str) -> None:
    """Stop with one line if ``feature``'s package is missing, naming the extra that installs it."""
    module, extra = FEATURES[feature]
    if not installed(module):
        raise ConfigError(f"{feature} needs the {module.split('.')[-1]!r} package, which is not installed: "
                          f"pip install 'petuner[{extra}]'")


def check_loggers(names: Sequence[str]) -> None:
    for name in names:
        if f"logger={name}" in FEATURES:
            require(f"logger={name}")


def check_hydra_plugins(overrides: Sequence[str], config_dir: Path | None = None) -> None:
    """The sweeper and launcher a command line picks, directly (``hydra/launcher=ray``) or through a sweep file
    (``sweep=lora_search`` overrides ``/hydra/sweeper``), must be installed: Hydra alone would say only that it
    cannot find ``hydra/launcher/ray``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key in ("hydra/sweeper", "hydra/launcher") and not override.is_delete():
            _require_plugin(key, override.get_value_element_as_str())
        elif key == "sweep" and not override.is_sweep_override():
            for plugin, choice in _sweep_plugins(override.get_value_element_as_str(), config_dir):
                _require_plugin(plugin, choice)


def _require_plugin(group: str, choice: str) -> None:
    if f"{group}={choice}" in FEATURES:
        require(f"{group}={choice}")


def _sweep_plugins(name: str, config_dir: Path | None) -> list[tuple[str, str]]:
    """The ``override /hydra/...`` entries of a sweep file's defaults list."""
    import yaml

    from petuner.config import search_dirs

    path = next((d / "sweep" / f"{name}.yaml" for d in search_dirs(config_dir) if (d / "sweep" / f"{name}.yaml")
                 .is_file()), None)
    if path is None:
        return []
    defaults: list[Any] = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    found = []
    for entry in defaults:
        for key, value in (entry.items() if isinstance(entry, dict) else []):
            group = key.removeprefix("override").strip().lstrip("/")
            if group in ("hydra/sweeper", "hydra/launcher"):
                found.append((group, str(value)))
    return found
