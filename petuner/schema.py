"""Typed config schemas: one dataclass per config group (per method for ``adapter``, per optimizer for
``optimizer``, per logger for ``logger``), registered in Hydra's ConfigStore by ``petuner.config``.

A YAML in ``conf/<group>/`` keeps only values and names its schema first in its defaults list::

    defaults:
      - lora_schema        # ConfigStore entry <group>/<name>_schema: the dataclass below
      - _self_
    r: 8

Each dataclass lives next to the code that reads it: adapters in their method module
(``LoRASchema`` in ``petuner/adapters/lora.py``), ``DataSchema`` in ``petuner/data/schema.py``,
``ModelSchema`` in ``petuner/models.py``, ``TrainerSchema`` in ``petuner/train/schema.py``,
loggers in ``petuner/train/logging.py``, optimizers in ``petuner/optim/schema.py``. Methods that share
options inherit (``QLoRASchema(LoRABaseSchema)``).

To add a key: add a field with its type and default; where the type alone does not say what is
allowed, give the field its check with one of the helpers here::

    r: int = number(8, integer=True)                 # an int > 0
    dropout: float = number(0.05, strict=False, below=1)
    scaling: str = choice("standard", ("standard", "rslora"))
    resume: bool = flag(False)

then its value in the YAML(s) and a row in the config table (docs/usage.md). OmegaConf refuses a key the
schema lacks and a value of the wrong type when the config is composed; ``one_line`` turns its
error into one ``ConfigError`` line (the field's own check message where it has one), and
``conform`` runs every field's check on a composed (or hand-built) group.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from petuner.checks import check_flag, check_number
from petuner.errors import ConfigError, first_line

CHECK = "check"
ALLOWED = "allowed"  # a choice field's values (the web page offers them in a menu)
Check = Callable[[Any, str, str], None]  # (group config, key, group path) -> raises ConfigError


def number(default: Any, *, low: float = 0, strict: bool = True, integer: bool = False, optional: bool = False,
           below: float | None = None) -> Any:
    """A numeric field: above ``low`` (at least, unless ``strict``), below ``below``; null if ``optional``."""
    def check(cfg: Any, key: str, group: str) -> None:
        check_number(cfg, key, group, low=low, strict=strict, integer=integer, optional=optional, below=below)

    return dataclasses.field(default=default, metadata={CHECK: check})


def choice(default: Any, allowed: Sequence[Any], *, shown: str | None = None) -> Any:
    """A field taking one of ``allowed`` (``shown`` replaces the list in the message)."""
    def check(cfg: Any, key: str, group: str) -> None:
        value = cfg.get(key)
        if value not in allowed:
            raise ConfigError(f"{group}.{key}={value!r}: allowed: "
                              f"{shown or ', '.join('null' if a is None else str(a) for a in allowed)}")

    return dataclasses.field(default=default, metadata={CHECK: check, ALLOWED: tuple(allowed)})


def flag(default: bool) -> Any:
    """A boolean field: only true or false (a string such as 'no' is refused, not read as a truth value)."""
    return dataclasses.field(default=default, metadata={CHECK: check_flag})


def checked(default: Any, check: Check) -> Any:
    """A field with its own check (for what ``number``, ``choice`` and ``flag`` do not cover)."""
    return dataclasses.field(default=default, metadata={CHECK: check})


def items(factory: Callable[[], Any], check: Check | None = None) -> Any:
    """A list or dict field (a fresh default per instance), with an optional check."""
    return dataclasses.field(default_factory=factory, metadata={CHECK: check} if check else {})


def field_check(schema: type, key: str) -> Check | None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    return fields[key].metadata.get(CHECK) if key in fields else None


def keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema) if f.name != "name"]


def check_values(cfg: Any, schema: type, group: str) -> None:
    """Run the check of every field of ``schema`` that ``cfg`` holds."""
    for f in dataclasses.fields(schema):
        check = f.metadata.get(CHECK)
        if check is not None and f.name in cfg:
            check(cfg, f.name, group)


def unknown_key(group: str, key: str, schema: type, what: str) -> ConfigError:
    """``group.key`` is not in ``schema``: one line with the closest key and the allowed ones."""
    allowed = keys(schema)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {group}.{close[0]}? " if close else ""
    return ConfigError(f"{group}.{key} is not an option of {what}; {hint}allowed: {', '.join(allowed) or '(none)'}")


def wrong_type(full_key: str, value: Any, schema: type | None) -> ConfigError:
    """A value OmegaConf could not convert to its field's type, as the field's own check words it."""
    group, _, key = full_key.rpartition(".")
    check = field_check(schema, key) if schema is not None and dataclasses.is_dataclass(schema) else None
    if check is not None:
        try:
            check({key: value}, key, group)
        except ConfigError as err:
            return err
    kind = ""
    if schema is not None and dataclasses.is_dataclass(schema):
        kind = {f.name: f.type for f in dataclasses.fields(schema)}.get(key, "")
    return ConfigError(f"{full_key}={value!r}: wrong type" + (f" (must be {kind})" if kind else ""))


def one_line(err: OmegaConfBaseException, group: str = "") -> ConfigError:
    """OmegaConf's error on a schema'd config as one ConfigError line."""
    full_key = str(getattr(err, "full_key", "") or "")
    if group and not full_key.startswith(group + "."):
        full_key = f"{group}.{full_key}" if full_key else group
    schema = getattr(err, "object_type", None)
    if isinstance(err, ConfigKeyError) and schema is not None and dataclasses.is_dataclass(schema):
        parent, _, key = full_key.rpartition(".")
        return unknown_key(parent, key, schema, f"{parent}")
    if isinstance(err, ValidationError):
        return wrong_type(full_key, getattr(err, "value", None), schema)
    return ConfigError(f"{full_key or 'config'}: {first_line(err)}")


def conform(schema: type, cfg: Any, group: str, what: str) -> DictConfig:
    """``cfg`` (a composed group, or a plain dict) as a config of ``schema``: unknown keys and wrong types
    refused, missing keys given their defaults, every field's check run (on the values as given, then
    typed). ``what`` names the choice in messages (``adapter=lora``). Interpolations are resolved first
    (against the run config ``cfg`` belongs to)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(plain, dict)
    allowed = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(str(k) for k in plain if k not in allowed)
    if unknown:
        raise unknown_key(group, unknown[0], schema, what)
    check_values(plain, schema, group)  # the values as given: OmegaConf would read 'no' or 1 as a boolean
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as err:
        raise one_line(err, group) from None
    assert isinstance(typed, DictConfig)
    check_values(typed, schema, group)
    return typed
