"""Sequence classification: {text, label} rows, labels mapped to ids in sorted order of their names."""

from __future__ import annotations

from typing import Any

from petuner.data.cache import cached_map


def build(dataset: Any, tokenizer: Any, cfg: Any, names: list[str], key: Any) -> Any:
    index = {name: i for i, name in enumerate(names)}
    limit = int(cfg.max_length)

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        enc = tokenizer(str(row["text"]), truncation=True, max_length=limit)
        truncated = len(enc["input_ids"]) == limit and len(tokenizer(str(row["text"]))["input_ids"]) > limit
        return {**enc, "labels": index[str(row["label"])], "truncated": int(truncated)}

    return cached_map(dataset, tokenize, "classification", [key, names, limit], remove_columns=dataset.column_names)
