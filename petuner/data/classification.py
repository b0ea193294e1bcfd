"""Sequence classification: {text, label} rows, labels mapped to ids in sorted order of their names."""

from __future__ import annotations

from typing import Any

from petuner.errors import PetunerError


def label_names(rows: list[dict[str, Any]]) -> list[str]:
    """Sorted label names; integer labels must already be 0..K-1."""
    labels = {row["label"] for row in rows}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        bad = sorted(v for v in labels if v < 0)
        if bad:
            raise PetunerError(f"label {bad[0]} is out of range: integer labels must be 0..K-1")
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(v) for v in labels)


def build(dataset: Any, tokenizer: Any, cfg: Any, names: list[str]) -> Any:
    index = {name: i for i, name in enumerate(names)}

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        enc = tokenizer(str(row["text"]), truncation=True, max_length=int(cfg.max_length))
        return {**enc, "labels": index[str(row["label"])]}

    return dataset.map(tokenize, remove_columns=dataset.column_names)
