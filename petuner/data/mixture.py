"""Mixing the training sets of several sources, deterministically under the data seed.

``concat`` keeps every source and scales it by its weight (0.5: a seeded half, 2: every example
twice); ``interleave`` draws from the sources with probabilities proportional to the weights through
``datasets.interleave_datasets``, stopping as its ``stopping_strategy`` says.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, concatenate_datasets, interleave_datasets

from petuner.data.columns import in_rows

MIXES = ("concat", "interleave")
STOPPING = ("first_exhausted", "all_exhausted")
SOURCE = "__source__"


def scale(dataset: Dataset, weight: float, seed: int) -> Dataset:
    """``round(weight * len)`` examples: whole copies, then a seeded sample for the fraction."""
    n = len(dataset)
    target = round(weight * n)
    copies, rest = divmod(target, n)
    order = np.random.default_rng(seed).permutation(n)[:rest]
    return dataset.select(np.concatenate([np.tile(np.arange(n), copies), np.sort(order)]).astype(np.int64))


def mix(trains: list[Dataset], weights: list[float], how: str, stopping: str, seed: int) -> tuple[Dataset, list[int]]:
    """The mixed training set and how many of its examples each source gave."""
    trains = [t.cast(trains[0].features) if t.features != trains[0].features else t for t in trains]
    tagged = [t.add_column(SOURCE, np.full(len(t), i)) for i, t in enumerate(trains)]
    if how == "concat":
        scaled = [scale(t, w, seed + i) for i, (t, w) in enumerate(zip(tagged, weights, strict=True))]
        mixed = concatenate_datasets(scaled)
    else:
        total = sum(weights)
        mixed = interleave_datasets(tagged, probabilities=[w / total for w in weights], seed=seed,
                                    stopping_strategy=stopping)
    sources = in_rows(mixed, mixed.data.column(SOURCE).to_numpy())
    counts = np.bincount(sources, minlength=len(trains)).tolist()
    return mixed.remove_columns(SOURCE), counts
