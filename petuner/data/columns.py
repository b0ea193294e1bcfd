"""The user's columns → petuner's: ``data.columns`` renames, the kind is read off the columns, nulls are found.

Every check here is on column names or one vectorised pass over a column, before anything is tokenized.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from petuner.data.conversations import FORMS, OPTIONAL, form_of
from petuner.errors import PetunerError

CONVERSATION_KINDS = ("chat", "sft")
# Checked in this order by data.kind=auto: preference pairs before plain text (a pair set may carry a text column),
# KTO's labelled completions before classification (both have a label).
PLAIN = {"preference": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
         "classification": ("text", "label"), "text": ("text",)}
PLAIN_OPTIONAL = {"preference": ("prompt", "margin")}  # margin: a reward model's per-pair margin (TRL's column)
NULLABLE = {"preference": ("prompt",)}  # optional columns that may be null in some rows (an implicit prompt)
NAMES = sorted({c for cols in (*FORMS.values(), *OPTIONAL.values(), *PLAIN.values(), *PLAIN_OPTIONAL.values())
                for c in cols})


def rename(dataset: Dataset, columns: dict[str, str] | None, where: str) -> Dataset:
    """Apply ``data.columns`` ({petuner name: the user's column})."""
    if not columns:
        return dataset
    have = set(dataset.column_names)
    for ours, theirs in columns.items():
        if theirs not in have:
            raise PetunerError(f"data.columns.{ours}={theirs!r}: {where} has no column {theirs!r} "
                               f"(columns: {', '.join(dataset.column_names)})")
    mapping = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    clashing = [c for c in dataset.column_names if c in mapping.values() and c not in mapping]
    return dataset.remove_columns(clashing).rename_columns(mapping)


def kind_and_form(names: list[str], kind: str, where: str) -> tuple[str, str | None]:
    """(kind, conversation form or None) from the column names and ``data.kind``."""
    form = form_of(set(names))
    if kind == "auto":
        if form is not None:
            return ("chat" if form in ("messages", "sharegpt") else "sft"), form
        kind = next((k for k, cols in PLAIN.items() if set(cols) <= set(names)), "")
        if not kind:
            raise PetunerError(f"{where}: cannot tell the data kind from columns {sorted(names)}: expected messages, "
                               "conversations, {instruction, output}, {prompt, response}, {chosen, rejected}, "
                               "{prompt, completion, label}, "
                               "{text, label} or {text} "
                               "(data.columns maps your names onto these)")
        return kind, None
    if kind in CONVERSATION_KINDS:
        if form is None:
            raise PetunerError(f"{where}: data.kind={kind} needs a messages or conversations column, "
                               f"{{instruction, output}} or {{prompt, response}}; columns are {sorted(names)}")
        return kind, form
    missing = [c for c in PLAIN[kind] if c not in names]
    if missing:
        raise PetunerError(f"{where}: data.kind={kind} needs column {missing[0]!r}; columns are {sorted(names)}")
    return kind, None


def needed(kind: str, form: str | None) -> tuple[str, ...]:
    return (*FORMS[form], *OPTIONAL.get(form, ())) if form else (*PLAIN[kind], *PLAIN_OPTIONAL.get(kind, ()))


def check_nulls(dataset: Dataset, required: tuple[str, ...], where: str) -> None:
    for column in required:
        nulls = np.flatnonzero(pc.is_null(dataset.data.column(column)).to_numpy(zero_copy_only=False))
        if len(nulls):
            raise PetunerError(f"{where} row {nulls[0] + 1}: no value in column {column!r}")


def check_numbers(dataset: Dataset, column: str, where: str) -> None:
    """Every value of ``column`` a finite number (a numeric column; in a text column, as a loader makes of a
    column mixing numbers and words, every value must read as one)."""
    if column not in dataset.column_names:
        return
    values = dataset.data.column(column)
    if pa.types.is_integer(values.type):
        return
    if pa.types.is_floating(values.type):
        finite = pc.is_finite(values).to_numpy(zero_copy_only=False)
        bad = (int(np.argmin(finite)), values[int(np.argmin(finite))].as_py()) if not finite.all() else None
    else:
        bad = next(((i, v) for i, v in enumerate(values.to_pylist()) if not _reads_as_number(v)), None)
    if bad is not None:
        raise PetunerError(f"{where} row {bad[0] + 1}: {column}={bad[1]!r}; a pair's {column} is a finite number")


def _reads_as_number(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))  # NaN and infinities are not
    except (TypeError, ValueError):
        return False


def in_rows(dataset: Dataset, per_row: np.ndarray) -> np.ndarray:
    """Values per row of the underlying table, in the dataset's own rows (after a select or interleave):
    reading a column through the dataset's indices row by row takes seconds per 100k rows."""
    return per_row[dataset._indices.column(0).to_numpy()] if dataset._indices is not None else per_row


def label_names(dataset: Dataset) -> list[str]:
    """Sorted label names; integer labels must already be 0..K-1."""
    labels = set(dataset.data.column("label").to_pylist())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        bad = sorted(v for v in labels if v < 0)
        if bad:
            raise PetunerError(f"label {bad[0]} is out of range: integer labels must be 0..K-1")
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(v) for v in labels)


def prepare(dataset: Dataset, kind: str, where: str, columns: Any) -> tuple[Dataset, str, str | None]:
    """Renamed, kind known, only the needed columns kept, each row numbered (``__row__``) for error lines."""
    dataset = rename(dataset, columns, where)
    kind, form = kind_and_form(dataset.column_names, kind, where)
    keep = [c for c in needed(kind, form) if c in dataset.column_names]
    nullable = (*OPTIONAL.get(form or "", ()), *NULLABLE.get(kind, ()))
    check_nulls(dataset, tuple(c for c in keep if c not in nullable), where)
    if "margin" in keep:  # a preference pair's (columns of other kinds are not read)
        check_numbers(dataset, "margin", where)
    dataset = dataset.select_columns(keep)
    return dataset.add_column("__row__", np.arange(len(dataset))), kind, form
