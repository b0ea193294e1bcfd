"""The compose form's widgets and their values: one widget per schema field, read back as command-line text."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from petuner.config import GROUPS, compose_config
from petuner.ui.compose import MULTI, RunSpec
from petuner.ui.fields import Field, run_fields, top_fields


def elem_id(path: str) -> str:
    """The widget's HTML id: ``field-adapter-r`` for adapter.r (what the browser test and users' CSS find)."""
    return "field-" + re.sub(r"[^\w]+", "-", path)


def describe(field: Field) -> str:
    return f"{field.type} · default {field.default}" + (f" · {field.help}" if field.help else "")


def widget(field: Field, key: str) -> gr.components.Component:
    """A checkbox for a flag, a menu for a choice, else a one-line text box taking command-line syntax."""
    common: dict[str, Any] = {"label": field.path, "info": describe(field), "key": key, "interactive": True,
                              "elem_id": elem_id(field.path), "min_width": 300}
    if field.is_flag:
        return gr.Checkbox(value=field.value == "true", **common)
    if field.allowed:
        return gr.Dropdown(choices=list(field.allowed), value=field.value, **common)
    return gr.Textbox(value=field.value, max_lines=1, **common)


def as_text(value: Any) -> str:
    """A widget's value as the command line writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def choices_of(values: Sequence[Any]) -> dict[str, str | list[str]]:
    """The group menus' values (in GROUPS order) as RunSpec choices."""
    return {g: (list(v or []) if g in MULTI else str(v)) for g, v in zip(GROUPS, values, strict=True)}


@functools.lru_cache(maxsize=32)
def _fields(key: tuple[tuple[str, str], ...], config_dir: Path | None) -> list[Field]:
    choices = dict(key)
    spec = RunSpec({g: ([x for x in c.split(",") if x] if g in MULTI else c) for g, c in choices.items()})
    cfg = compose_config([*spec.choice_overrides(), "run_dir=."], config_dir)
    grouped = run_fields(cfg, choices, config_dir)
    return [*top_fields(cfg, config_dir), *(f for group in GROUPS for f in grouped[group])]


def form_fields(choices: dict[str, str | list[str]], config_dir: Path | None) -> list[Field]:
    """Every field of the chosen groups (composed once per set of choices)."""
    key = tuple((g, ",".join(c) if isinstance(c, list) else c) for g, c in choices.items())
    return _fields(key, config_dir)


def spec_from(choices: dict[str, str | list[str]], processes: Any, fields: Sequence[Field],
              values: Sequence[Any]) -> RunSpec:
    """The run the form describes: only the keys whose text differs from the composed value become overrides."""
    changed = {f.path: as_text(v) for f, v in zip(fields, values, strict=True) if as_text(v) != f.value}
    return RunSpec(choices, changed, processes=int(processes if processes is not None else 1))


def field_of(message: str, fields: Sequence[Field]) -> Field | None:
    """The field an error line names (the longest key it mentions), to show the line beside it."""
    named = [f for f in fields if re.search(rf"(?<![\w.]){re.escape(f.path)}(?![\w])", message)]
    return max(named, key=lambda f: len(f.path), default=None)
