"""The run config: every group's schema registered in Hydra's ConfigStore, composition, and validation.

Each config group has one schema per choice, a dataclass next to the code that reads it (see
``petuner.schema`` for the mechanism and how to add a key):

    model      petuner.models.ModelSchema                  model_schema
    data       petuner.data.schema.DataSchema              data_schema
    adapter    <method module>.<Method>Schema              <method name>_schema (adapter=lora: lora_schema)
    optimizer  petuner.optim.schema.<Optimizer>Schema      <optimizer name>_schema
    trainer    petuner.train.schema.TrainerSchema          trainer_schema
    logger     petuner.train.logging.LoggerSchema          (one schema for any mix of sinks; checked by validate)
    loss       <objective module>.<Objective>Schema         <objective name>_schema (loss=dpo: dpo_schema)

``register_schemas`` stores them (``train.py`` and ``compose_config`` call it before Hydra composes).
Composing then refuses a key a schema lacks and a value of the wrong type; both become one
``ConfigError`` line here. ``validate`` checks a composed config group by group (ranges, choices,
keys that contradict each other) before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from petuner.errors import ConfigError, first_line
from petuner.schema import conform, field_check, keys, one_line

SHIPPED = "pkg://petuner.conf"  # the config groups inside the package (conf/ in the repository)
SHIPPED_PRIMARY = "petuner"  # conf/config.yaml, also in the ConfigStore under this name (see primary_search_path)
CONF_DIR = Path(str(importlib.resources.files("petuner.conf")))  # the same folder on disk, for listing choices
EXPORTS = (None, "merged", "peft")
GROUPS = ("model", "data", "adapter", "optimizer", "trainer", "logger", "loss")


def schemas() -> dict[str, dict[str, type]]:
    """group → ConfigStore name → schema dataclass."""
    from petuner.adapters.registry import adapter_names, get_adapter_class
    from petuner.data.schema import DataSchema
    from petuner.models import ModelSchema
    from petuner.objectives import get_objective_class, objective_names
    from petuner.optim import OPTIMIZERS
    from petuner.train.schema import TrainerSchema

    return {
        "model": {"model_schema": ModelSchema},
        "data": {"data_schema": DataSchema},
        "adapter": {f"{n}_schema": get_adapter_class(n).schema for n in adapter_names()},
        "optimizer": {f"{n}_schema": spec.schema for n, spec in OPTIMIZERS.items()},
        "trainer": {"trainer_schema": TrainerSchema},
        "logger": {},  # one schema for every choice and their mixes: petuner.train.logging.LoggerSchema
        "loss": {f"{n}_schema": get_objective_class(n).schema for n in objective_names()},
    }


def register_schemas() -> None:
    """Store every group's schemas in Hydra's ConfigStore, where the YAMLs' defaults lists find them; and the
    shipped primary config, for a ``--config-dir`` that has none (see primary_search_path)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, named in schemas().items():
        for name, schema in named.items():
            store.store(group=group, name=name, node=schema)
    store.store(name=SHIPPED_PRIMARY, node=OmegaConf.load(CONF_DIR / "config.yaml"))


def group_schema(cfg: DictConfig, group: str) -> type:
    """The schema a composed group must follow: the one its ``name`` picks where the group has several."""
    from petuner.adapters.registry import get_adapter_class
    from petuner.objectives import get_objective_class
    from petuner.optim import optimizer_schema
    from petuner.train.logging import LoggerSchema

    node = cfg[group]
    if group == "adapter":
        return get_adapter_class(str(node.name)).schema
    if group == "loss":
        return get_objective_class(str(node.name)).schema
    if group == "optimizer":
        return optimizer_schema(str(node.name))
    if group == "logger":
        return LoggerSchema
    return next(iter(schemas()[group].values()))


@dataclass
class Plan:
    """What ``validate`` built while checking: the run uses these rather than building them again."""

    method: Any  # the adapter method (petuner.adapters.AdapterMethod), options checked
    data: DictConfig  # the data group, checked against its schema and the model's task
    objective: Any = None  # the training objective (petuner.objectives), options checked


def choice_name(cfg: DictConfig, group: str) -> str:
    """How messages name a group's choice: ``optimizer=adamw``, or ``the model schema`` for a group without names."""
    name = cfg[group].get("name")
    return f"{group}={name}" if name else f"the {group} schema"


def validate(cfg: DictConfig) -> Plan:
    """Check every group of a composed run config; raises ConfigError naming the first bad value."""
    from petuner.adapters import build_adapter
    from petuner.choices import DIRECTIONS, TASK_METRICS
    from petuner.continued import continue_from
    from petuner.data.schema import check_data_combination
    from petuner.extras import check_loggers
    from petuner.models import check_model_combination
    from petuner.objectives import build_objective
    from petuner.train.logging import logger_names
    from petuner.train.schema import check_trainer_combination

    for group in GROUPS:
        if group not in cfg or not isinstance(cfg[group], DictConfig):
            raise ConfigError(f"config group {group!r} is missing from the run config")
    checked = {group: conform(group_schema(cfg, group), cfg[group], group, choice_name(cfg, group))
               for group in GROUPS if group not in ("adapter", "loss")}
    check_model_combination(checked["model"])
    check_data_combination(checked["data"], checked["model"].task)
    continue_from(cfg)
    method = build_adapter(cfg.adapter)
    objective = build_objective(cfg.loss)
    check_trainer_combination(checked["trainer"])
    check_loggers(logger_names(checked["logger"]))
    task = checked["model"].task
    objective.check_run(task, method, checked["data"], continued=bool(cfg.get("init_from")))
    if cfg.objective not in DIRECTIONS:  # the metrics this loss measures on any task
        raise ConfigError(f"objective={cfg.objective!r}: allowed: {', '.join(objective.measures)}")
    measured = [m for m in objective.measures if m in TASK_METRICS[task]]
    if cfg.objective not in measured:  # loss=dpo: the rewards, not perplexity
        raise ConfigError(f"objective={cfg.objective} is not measured for model.task={task}; "
                          f"allowed: {', '.join(measured)}")
    if cfg.get("export") not in EXPORTS:
        raise ConfigError(f"export={cfg.export!r}: allowed: null, merged, peft")
    return Plan(method=method, data=checked["data"], objective=objective)


def search_dirs(config_dir: Path | None = None) -> list[Path]:
    """Where config files are looked up, first match wins: the user's ``--config-dir``, then the shipped groups."""
    return [*([Path(config_dir).resolve()] if config_dir is not None else []), CONF_DIR]


@dataclass
class HydraEntry:
    """Where Hydra starts composing: the primary search path, the primary config's name, and extra overrides."""

    config_path: str
    config_name: str
    overrides: list[str]


def hydra_entry(config_dir: Path | None = None, config_name: str | None = None) -> HydraEntry:
    """How ``petuner train [--config-dir DIR] [--config-name NAME]`` enters Hydra.

    Without a folder the shipped groups are the primary path. With one, the user's folder is primary and the
    shipped groups follow it (``hydra.searchpath``). Hydra takes the first match, so the user's files add to the
    shipped groups *and* override same-named ones; Hydra's own ``--config-dir`` puts the folder after the primary
    path, where a same-named file would be silently ignored. Hydra looks the primary config up before it reads
    ``hydra.searchpath``, so a folder without a ``config.yaml`` starts from the shipped primary as the ConfigStore
    holds it (``petuner``; a user's own primary can extend it with ``defaults: [petuner, ...]``).
    """
    if config_dir is None:
        return HydraEntry(SHIPPED, config_name or "config", [])
    folder = Path(config_dir).resolve()
    name = config_name or ("config" if (folder / "config.yaml").is_file() else SHIPPED_PRIMARY)
    return HydraEntry(str(folder), name, [f"hydra.searchpath=[{SHIPPED}]"])


def compose_config(overrides: Sequence[str] = (), config_dir: Path | None = None,
                   config_name: str | None = None) -> DictConfig:
    """The run config ``petuner train [--config-dir DIR] [--config-name NAME] <overrides>`` would get, for code
    (tests, benchmarks, notebooks, ``petuner data``).

    Without Hydra's runtime, ``run_dir`` must be among the overrides. A key no schema has, or a value of
    the wrong type, is one ConfigError line.
    """
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.errors import HydraException

    register_schemas()
    entry = hydra_entry(config_dir, config_name)
    init = (initialize_config_module("petuner.conf", version_base="1.3") if config_dir is None
            else initialize_config_dir(config_dir=entry.config_path, version_base="1.3"))
    try:
        with init:
            cfg = compose(entry.config_name, overrides=[*entry.overrides, *overrides])
    except HydraException as err:
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException) and not re.search(r"Could not override '", str(err)):
            raise one_line(cause) from None
        raise
    check_override_values(cfg, overrides)
    return cfg


def check_override_values(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Run each overridden field's own check on the value as written: OmegaConf would read ``no`` or ``1``
    as a boolean, and a command line must say true or false."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        parent, _, key = override.key_or_group.rpartition(".")
        if not parent or override.is_sweep_override() or override.is_delete() or override.package:
            continue
        node = OmegaConf.select(cfg, parent)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        check = field_check(schema, key) if schema is not None and dataclasses.is_dataclass(schema) else None
        if check is not None:
            check({key: override.value()}, key, parent)


def group_choices(group: str, config_dir: Path | None = None) -> list[str]:
    """The choices of a config group: the shipped files and the user's (``--config-dir``) together."""
    return sorted({p.stem for folder in search_dirs(config_dir) for p in (folder / group).glob("*.yaml")})


def config_groups(config_dir: Path | None = None) -> set[str]:
    return {p.name for folder in search_dirs(config_dir) if folder.is_dir() for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith("_")}


@dataclass
class CommandLine:
    """What a ``petuner train`` / ``train.py`` command line asks Hydra for."""

    overrides: list[str]
    config_dir: Path | None = None  # --config-dir: the user's own groups, before the shipped ones
    config_name: str | None = None  # --config-name: the primary config (an experiment file, say)


def read_command_line(argv: Sequence[str]) -> CommandLine:
    """The command line read with Hydra's own argument parser, so that its flags (``--cfg job``, ``--resolve``,
    ``--info``, ``--help``, ``-m``, ...) and their values are never taken for overrides. A command line Hydra
    cannot read gives no overrides: Hydra then says what is wrong."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(list(argv))
    except SystemExit:
        return CommandLine([])
    if args.shell_completion:  # -sc install=bash / query=bash: Hydra's words, not overrides
        return CommandLine([])
    if args.config_dir is not None and not Path(args.config_dir).is_dir():
        raise ConfigError(f"--config-dir {args.config_dir}: no such folder")
    return CommandLine(list(args.overrides), Path(args.config_dir) if args.config_dir else None, args.config_name)


def check_command_line(overrides: Sequence[str], config_dir: Path | None = None,
                       config_name: str | None = None) -> None:
    """Everything Hydra would reject on this command line, as one line (sweeps checked at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from petuner.extras import check_hydra_plugins

    check_group_choices(overrides, config_dir)
    check_hydra_plugins(overrides, config_dir)
    plain = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group.split(".")[0].split("/")[0] == "hydra":
            continue
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except Exception:  # a search space (interval, ...): the sweeper checks it
                continue
            plain.append(f"{override.get_key_element()}={first}")
        else:
            plain.append(override.input_line)
    try:
        compose_config([*plain, "run_dir=."], config_dir, config_name)
    except HydraException as err:
        bad = re.search(r"Could not override '([^']+)'", str(err))
        if not bad:
            raise ConfigError(first_line(err)) from None
        rest = [o for o in plain if not o.lstrip("+~").startswith(bad.group(1) + "=")]
        raise not_a_key(bad.group(1), compose_config([*rest, "run_dir=."], config_dir, config_name)) from None


def not_a_key(key: str, cfg: DictConfig) -> ConfigError:
    """``key`` is in no schema: one line with the closest key of its group and, for open dicts, the + hint."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else None
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, siblings, n=1)
    hint = f"did you mean {parent}.{close[0]}? " if close else ""
    if schema is not None and dataclasses.is_dataclass(schema):
        return ConfigError(f"{key} is not a config key; {hint}allowed: {', '.join(keys(schema))}")
    return ConfigError(f"{key} is not a config key; {hint}(a new key needs a leading +: +{key}=...)")


def check_group_choices(overrides: Sequence[str], config_dir: Path | None = None) -> None:
    """Reject ``group=choice`` overrides (sweeps included) naming a YAML that does not exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = config_groups(config_dir)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's grammar errors span lines; keep the first
        raise ConfigError(f"cannot parse the command line: {first_line(err)}") from None
    for override in parsed:
        key = override.key_or_group
        if key not in groups or override.is_delete():
            continue
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        elif isinstance(override.value(), list):  # several options at once, e.g. logger=[tensorboard,csv]
            values = [str(v) for v in override.value()]
        else:
            values = [override.get_value_element_as_str()]
        allowed = group_choices(key, config_dir)
        for value in values:
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not a choice of the {key!r} config group; "
                                  f"allowed: {', '.join(allowed)}")
