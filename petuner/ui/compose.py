"""A run as the page composes it: group choices and changed keys → the overrides, the command, the checked config.

The page keeps no config of its own: what it launches is a command line, checked first by the same code
``train.py`` runs (``check_command_line``, then ``validate``), so a bad value is the command line's one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from petuner.config import GROUPS, check_command_line, compose_config, group_choices, search_dirs, validate
from petuner.errors import ConfigError

TOP_LEVEL = ("objective", "export")  # run keys outside the groups (conf/config.yaml)
MULTI = ("logger",)  # groups of which several choices compose at once (logger=[tensorboard,csv])


@dataclass
class RunSpec:
    """What the form holds: a choice per group, and the keys whose text the user changed."""

    choices: dict[str, str | list[str]]
    changed: dict[str, str] = field(default_factory=dict)  # "group.key" (or a top-level key) → text as typed
    processes: int = 1

    def choice_overrides(self) -> list[str]:
        out = []
        for group in GROUPS:
            choice = self.choices.get(group)
            if isinstance(choice, list):  # logger=[tensorboard,csv]; one: logger=csv; none: logger=none
                choice = (f"[{','.join(choice)}]" if len(choice) > 1 else choice[0]) if choice else "none"
            if choice:
                out.append(f"{group}={choice}")
        return out

    def overrides(self) -> list[str]:
        return [*self.choice_overrides(), *(f"{key}={text}" for key, text in self.changed.items())]


def menus(config_dir: Path | None = None) -> dict[str, list[str]]:
    """Each group's choices: the YAMLs shipped in (or added to) the config directory."""
    return {group: group_choices(group, config_dir) for group in GROUPS}


def default_choices(config_dir: Path | None = None) -> dict[str, str | list[str]]:
    """The choices ``petuner train`` makes with no override: the defaults lists of the primary configs (the
    shipped ``config.yaml``, then the user's, which may change some)."""
    import yaml

    picked: dict[str, str | list[str]] = {}
    for folder in reversed(search_dirs(config_dir)):
        path = folder / "config.yaml"
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []
        for entry in defaults:
            for group, choice in (entry.items() if isinstance(entry, dict) else ()):
                if group in GROUPS and choice is not None:
                    picked[group] = [str(choice)] if group in MULTI else str(choice)
    return picked


def composed(spec: RunSpec, config_dir: Path | None = None) -> DictConfig:
    """The config the command would run, checked as ``train.py`` checks it (one ConfigError line if not)."""
    if spec.processes < 1:
        raise ConfigError(f"processes={spec.processes}: must be >= 1 (above 1, the run starts under torchrun)")
    overrides = spec.overrides()
    check_command_line(overrides, config_dir)
    cfg = compose_config([*overrides, "run_dir=."], config_dir)
    validate(cfg)
    return cfg

