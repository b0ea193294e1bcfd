"""Validate a composed config before anything heavy is loaded: one clear line per problem.

Each config group is checked by the module that owns it (model → models, data → data, adapter →
its registry entry, optimizer → optim, trainer → here). ``check_group_choices`` runs on the command
line before Hydra composes, so an unknown ``adapter=lorra`` is one line naming what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from petuner.checks import check_flag, check_number
from petuner.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXPORTS = (None, "merged", "peft")


def check_trainer_cfg(cfg: Any) -> None:
    from petuner.train.device import PRECISIONS
    from petuner.train.guard import ACTIONS

    if cfg.get("max_steps") is None and cfg.get("epochs") is None:
        raise ConfigError("trainer.max_steps and trainer.epochs are both null: set one of them")
    for key in ("max_steps", "epochs", "eval_every", "save_every"):
        check_number(cfg, key, "trainer", low=1, strict=False, integer=True, optional=True)
    for key in ("batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "log_every"):
        check_number(cfg, key, "trainer", low=1, strict=False, integer=True)
    for key in ("seed", "num_workers"):
        check_number(cfg, key, "trainer", strict=False, integer=True)
    check_number(cfg, "max_grad_norm", "trainer", optional=True)
    check_number(cfg, "early_stopping_patience", "trainer", low=1, strict=False, integer=True, optional=True)
    check_number(cfg, "early_stopping_min_delta", "trainer", low=0, strict=False)
    if cfg.early_stopping_patience and not cfg.eval_every:
        raise ConfigError(f"trainer.early_stopping_patience={cfg.early_stopping_patience} needs evaluations: "
                          "set trainer.eval_every")
    if cfg.precision not in ("auto", *PRECISIONS):
        raise ConfigError(f"trainer.precision={cfg.precision!r}: allowed: auto, {', '.join(PRECISIONS)}")
    if cfg.on_nonfinite not in ACTIONS:
        raise ConfigError(f"trainer.on_nonfinite={cfg.on_nonfinite!r}: allowed: {', '.join(ACTIONS)}")
    for key in ("resume", "labelled_logits", "gradient_checkpointing"):
        check_flag(cfg, key, "trainer")


def validate(cfg: DictConfig) -> None:
    """Check every group of a composed run config; raises ConfigError naming the first bad value."""
    from petuner.adapters import build_adapter
    from petuner.choices import DIRECTIONS
    from petuner.data import check_data_cfg
    from petuner.models import check_model_cfg
    from petuner.optim import check_optimizer_cfg
    from petuner.train.logging import logger_names

    for group in ("model", "data", "adapter", "optimizer", "trainer", "logger"):
        if group not in cfg or not isinstance(cfg[group], DictConfig):
            raise ConfigError(f"config group {group!r} is missing from the run config")
    check_model_cfg(cfg.model)
    check_data_cfg(cfg.data, cfg.model.task)
    build_adapter(cfg.adapter)
    check_optimizer_cfg(cfg.optimizer)
    check_trainer_cfg(cfg.trainer)
    logger_names(cfg.logger)
    if cfg.objective not in DIRECTIONS:
        raise ConfigError(f"objective={cfg.objective!r}: allowed: {', '.join(DIRECTIONS)}")
    if cfg.get("export") not in EXPORTS:
        raise ConfigError(f"export={cfg.export!r}: allowed: null, merged, peft")


def compose_config(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """The run config ``python train.py <overrides>`` would get, for code (tests, benchmarks, notebooks).

    Without Hydra's runtime, ``run_dir`` must be among the overrides.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_command_line(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Everything Hydra would reject on this command line, as one line (sweeps checked at their first value)."""
    import difflib
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

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
            raise ConfigError(str(err).strip().splitlines()[0]) from None
        key = bad.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in plain if not o.lstrip("+~").startswith(key + "=")]
        node = OmegaConf.select(compose_config([*rest, "run_dir=."], conf_dir), parent) if parent else None
        siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f"did you mean {parent}.{close[0]}? " if close else ""
        raise ConfigError(f"{key} is not a config key; {hint}(a new key needs a leading +: +{key}=...)") from None


def check_group_choices(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=choice`` overrides (sweeps included) naming a YAML that does not exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's grammar errors span lines; keep the first
        raise ConfigError(f"cannot parse the command line: {str(err).splitlines()[0]}") from None
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
