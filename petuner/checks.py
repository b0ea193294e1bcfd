"""Value checks shared by every config group: one ConfigError line naming ``group.key=value`` and what is allowed."""

from __future__ import annotations

from typing import Any

from petuner.errors import ConfigError


def shown(value: Any) -> str:
    """A value as the user wrote it: a typed float field holds 0 as 0.0; show it as 0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(int(value))
    return repr(value)


def check_number(cfg: Any, key: str, group: str, *, low: float = 0, strict: bool = True, integer: bool = False,
                 optional: bool = False, below: float | None = None) -> None:
    """``group.key`` must be a number (an int with ``integer``) above ``low`` (at least, unless ``strict``),
    below ``below`` if given; null only if ``optional``."""
    value = cfg.get(key)
    if value is None and optional:
        return
    ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
          and (value > low if strict else value >= low) and (below is None or value < below))
    if not ok:
        what = "an integer" if integer else "a number"
        bound = f"in [{low:g}, {below:g})" if below is not None else f"{'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{group}.{key}={shown(value)}: must be {what} {bound}" + (" or null" if optional else ""))


def check_flag(cfg: Any, key: str, group: str) -> None:
    if not isinstance(cfg.get(key), bool):
        raise ConfigError(f"{group}.{key}={cfg.get(key)!r}: must be true or false")
