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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from petuner.errors import ConfigError, first_line
from petuner.schema import conform, field_check, keys, one_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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
    """Store every group's schemas in Hydra's ConfigStore, where the YAMLs' defaults lists find them."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, named in schemas().items():
        for name, schema in named.items():
            store.store(group=group, name=name, node=schema)


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
    from petuner.models import check_model_combination
    from petuner.objectives import build_objective
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


def compose_config(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """The run config ``python train.py <overrides>`` would get, for code (tests, benchmarks, notebooks).

    Without Hydra's runtime, ``run_dir`` must be among the overrides. A key no schema has, or a value of
    the wrong type, is one ConfigError line.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
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


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def command_line_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides on a ``train.py`` command line, read with Hydra's own argument parser, so that its flags
    (``--cfg job``, ``--resolve``, ``--info``, ``--help``, ``-m``, ...) and their values are never taken for
    overrides. A command line Hydra cannot read gives no overrides: Hydra then says what is wrong."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(list(argv))
    except SystemExit:
        return []
    return list(args.overrides)


def check_command_line(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Everything Hydra would reject on this command line, as one line (sweeps checked at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    check_group_choices(overrides, conf_dir)
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
        compose_config([*plain, "run_dir=."], conf_dir)
    except HydraException as err:
        bad = re.search(r"Could not override '([^']+)'", str(err))
        if not bad:
            raise ConfigError(first_line(err)) from None
        raise not_a_key(bad.group(1), [o for o in plain if not o.lstrip("+~").startswith(bad.group(1) + "=")],
                        conf_dir) from None


def not_a_key(key: str, rest: Sequence[str], conf_dir: Path) -> ConfigError:
    """``key`` is in no schema: one line with the closest key of its group and, for open dicts, the + hint."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(compose_config([*rest, "run_dir=."], conf_dir), parent) if parent else None
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, siblings, n=1)
    hint = f"did you mean {parent}.{close[0]}? " if close else ""
    if schema is not None and dataclasses.is_dataclass(schema):
        return ConfigError(f"{key} is not a config key; {hint}allowed: {', '.join(keys(schema))}")
    return ConfigError(f"{key} is not a config key; {hint}(a new key needs a leading +: +{key}=...)")


def check_group_choices(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=choice`` overrides (sweeps included) naming a YAML that does not exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
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
        allowed = group_choices(key, conf_dir)
        for value in values:
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not a choice of the {key!r} config group; "
                                  f"allowed: {', '.join(allowed)}")
