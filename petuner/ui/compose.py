"""A run as the page composes it: group choices and changed keys → the overrides, the command, the checked config.

The page keeps no config of its own: what it launches is a command line, checked first by the same code
``train.py`` runs (``check_command_line``, then ``validate``), so a bad value is the command line's one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from petuner.config import CONF_DIR, GROUPS, check_command_line, compose_config, group_choices, validate

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


def menus(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Each group's choices: the YAMLs shipped in (or added to) the config directory."""
    return {group: group_choices(group, conf_dir) for group in GROUPS}


def default_choices(conf_dir: Path = CONF_DIR) -> dict[str, str | list[str]]:
    """The choices ``python train.py`` makes with no override (conf/config.yaml's defaults list)."""
    import yaml

    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", [])
    picked: dict[str, str | list[str]] = {}
    for entry in defaults:
        for group, choice in (entry.items() if isinstance(entry, dict) else ()):
            if group in GROUPS and choice is not None:
                picked[group] = [str(choice)] if group in MULTI else str(choice)
    return picked


def composed(spec: RunSpec, conf_dir: Path = CONF_DIR) -> DictConfig:
    """The config the command would run, checked as ``train.py`` checks it (one ConfigError line if not)."""
    overrides = spec.overrides()
    check_command_line(overrides, conf_dir)
    cfg = compose_config([*overrides, "run_dir=."], conf_dir)
    validate(cfg)
    return cfg

