"""The form of a run, read from the schemas: every key of every chosen group, with its type, default and help.

Nothing here names a key. A group's fields are its schema's dataclass fields (``petuner.config.group_schema``);
the value shown is the composed config's (the chosen YAML's, the model's defaults applied); the help is the
field's comment in the schema's source, else the key's comment in the chosen YAML. Nested schemas (the
logger's sinks) open into their own fields. A key added to a schema therefore appears in the page by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from petuner.config import CONF_DIR, GROUPS, group_schema, search_dirs
from petuner.schema import ALLOWED

YAML_COMMENT = re.compile(r"^(\w+):[^#]*#\s*(.+)$")  # key: value  # its help


@dataclass(frozen=True)
class Field:
    """One key of the form: ``group.key`` on the command line."""

    group: str
    key: str  # inside the group, dotted for nested schemas (wandb.project)
    type: str  # as the schema annotates it
    default: str  # the schema's default, written as on a command line
    value: str  # the composed config's value, written as on a command line
    help: str
    allowed: tuple[str, ...] | None  # a choice field's values

    @property
    def path(self) -> str:
        return f"{self.group}.{self.key}" if self.group else self.key

    @property
    def is_flag(self) -> bool:
        return self.type == "bool"


def override_text(value: Any) -> str:
    """A config value as a Hydra command line writes it (``null``, ``true``, ``[a,b]``, ``{a:1}``, quoted text)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_text(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if isinstance(value, str) and (not text or re.search(r"[\s,=:\[\]{}()'\"\\]", text)):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


@functools.cache
def source_comments(schema: type) -> dict[str, str]:
    """Field name → its comment in the dataclass source (trailing, or the comment lines just above it)."""
    comments: dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # defined where no source is kept (an interactive session)
            continue
        pending: list[str] = []
        for line in source.splitlines():
            match = re.match(r"^\s+(\w+)\s*:[^=]+(=.*)?$", line)
            comment = _comment(line)
            if match and not line.lstrip().startswith("#"):
                comments[match.group(1)] = comment or " ".join(pending)
                pending = []
            elif line.lstrip().startswith("#"):
                pending.append(line.strip().lstrip("#").strip())
            else:
                pending = []
    return comments


def _comment(line: str) -> str:
    """A source line's trailing comment (tokenized, so a ``#`` inside a string is not one)."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if token.type == tokenize.COMMENT:
                return token.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return ""


def yaml_comments(path: Path) -> dict[str, str]:
    """Top-level key → its comment in a YAML file (trailing, or the comment lines just above it)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        key = re.match(r"^(\w+):", line)
        if key:
            trailing = YAML_COMMENT.match(line)
            comments[key.group(1)] = trailing.group(2).strip() if trailing else " ".join(pending)
        pending = [*pending, line.lstrip("# ").strip()] if line.startswith("#") else []
    return comments


def config_file(config_dir: Path | None, name: str) -> Path:
    """Where a config file is read from: the user's folder first, then the shipped groups (as Hydra looks)."""
    found = [folder / name for folder in search_dirs(config_dir) if (folder / name).is_file()]
    return found[0] if found else CONF_DIR / name


def top_fields(cfg: DictConfig, config_dir: Path | None) -> list[Field]:
    """The run's keys outside the groups (objective, export), with conf/config.yaml's comments."""
    from petuner.choices import DIRECTIONS
    from petuner.config import EXPORTS

    help_text = {**yaml_comments(CONF_DIR / "config.yaml"), **yaml_comments(config_file(config_dir, "config.yaml"))}
    return [Field(group="", key=key, type="str | None" if None in allowed else "str", default=override_text(cfg[key]),
                  value=override_text(cfg[key]), help=help_text.get(key, ""),
                  allowed=tuple(override_text(a) for a in allowed))
            for key, allowed in (("objective", tuple(DIRECTIONS)), ("export", EXPORTS))]


def schema_fields(schema: type, node: Any, group: str, prefix: str = "", yaml_help: dict[str, str] | None = None
                  ) -> list[Field]:
    """The fields of ``schema`` with the values of ``node`` (a composed group, or one of its nested schemas)."""
    found = []
    for f in dataclasses.fields(schema):
        if f.name == "name":  # the group's choice itself: picked from the menu above the form
            continue
        value = node.get(f.name) if node is not None else None
        nested = _nested_schema(schema, f.name)
        if nested is not None:  # a sink the logger menu switches on or off: its own keys, when on
            found += schema_fields(nested, value, group, f"{prefix}{f.name}.") if isinstance(value, DictConfig) else []
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = source_comments(schema).get(f.name) or (yaml_help or {}).get(f.name, "")
        allowed = f.metadata.get(ALLOWED)
        found.append(Field(group=group, key=prefix + f.name, type=str(f.type), default=override_text(default),
                           value=override_text(value), help=help_text,
                           allowed=tuple(override_text(a) for a in allowed) if allowed else None))
    return found


def _nested_schema(schema: type, name: str) -> type | None:
    """The dataclass a field holds (``WandbSchema | None`` → WandbSchema), if it holds one."""
    hint = typing.get_type_hints(schema).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def run_fields(cfg: DictConfig, choices: dict[str, str], config_dir: Path | None) -> dict[str, list[Field]]:
    """Group → its fields, for a composed run config and the group choices that composed it."""
    out = {}
    for group in GROUPS:
        schema = group_schema(cfg, group)
        choice = str(choices.get(group, "")).split(",")[0].strip("[]")
        out[group] = schema_fields(schema, cfg[group], group,
                                   yaml_help=yaml_comments(config_file(config_dir, f"{group}/{choice}.yaml")))
    return out

