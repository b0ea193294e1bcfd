"""``data.format=hf``: anything the ``datasets`` library loads — a local file or folder, or a hub id.

Local files go to the builder their extension names (json/jsonl, csv, parquet, arrow); a folder is
either one written by ``Dataset.save_to_disk`` or one ``load_dataset`` reads by its files. Whatever
``datasets`` raises while reading the user's data becomes one line naming ``data.path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from petuner.errors import PetunerError, first_line

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
            ".arrow": "arrow", ".txt": "text"}


def _offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).suffix.lower() in BUILDERS or ref.count("/") > 1


def _load(ref: str, subset: str | None) -> Any:
    path = Path(ref).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PetunerError(f"data.path={ref!r}: unknown file type {path.suffix!r} "
                               f"(allowed: {', '.join(sorted(BUILDERS))})")
        if path.stat().st_size == 0:
            raise PetunerError(f"data.path={ref!r}: the file is empty")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), **kwargs)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), subset)
    if _looks_local(ref):
        raise PetunerError(f"data.path={ref!r}: no such file or folder")
    try:
        return datasets.load_dataset(ref, subset)
    except ConnectionError:
        if _offline():
            raise PetunerError(f"data.path={ref!r}: not in the local datasets cache and the hub is offline "
                               "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); download it once online, or set data.path "
                               "to a local file or folder (json, jsonl, csv, parquet, arrow)") from None
        raise


def load(ref: str, split: str, subset: str | None) -> datasets.Dataset:
    """One split of the dataset at ``ref`` (``data.path``)."""
    try:
        loaded = _load(ref, subset)
    except PetunerError:
        raise
    except Exception as err:  # reading the user's data: any failure is a bad input
        if "corresponds to no data" in str(err):  # datasets' words for a file without rows
            raise PetunerError(f"data.path={ref!r}: split {split!r} has no rows") from None
        raise PetunerError(f"data.path={ref!r}: cannot be read by datasets ({first_line(err)})") from None
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise PetunerError(f"data.split={split!r} is not in data.path={ref!r} (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise PetunerError(f"data.path={ref!r}: split {split!r} has no rows")
    return loaded
