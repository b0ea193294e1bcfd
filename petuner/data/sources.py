"""Read raw rows: the packaged corpora and the user's JSONL files here, everything else through ``hf``.

Each reader returns a list of plain dicts; the task modules (sft, text, classification) turn rows
into tokenized examples. Corpora that ship as folders of YAML or text files need a few lines of
reading; everything after that goes through the ``datasets`` library.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from datasets import Dataset

from petuner import assets
from petuner.data import hf
from petuner.data.conversations import as_json_text
from petuner.errors import ConfigError, PetunerError, first_line
from petuner.io import json_lines

Rows = list[dict[str, Any]]
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader: 10x faster than pure Python


def read_chatterbot(path: Path) -> Rows:
    """Chatterbot YAML: each conversation alternates user/bot turns; keep every (user, bot) pair."""
    rows: Rows = []
    for file in sorted(path.glob("*.yml")):
        for conversation in yaml.load(file.read_text(encoding="utf-8"), Loader=LOADER).get("conversations", []):
            turns = [str(t).strip() for t in conversation]
            rows += [{"prompt": turns[i], "response": turns[i + 1]}
                     for i in range(0, len(turns) - 1, 2) if turns[i] and turns[i + 1]]
    return rows


def read_label_folders(path: Path) -> Rows:
    """One sub-folder per label, one text file per document (BBC News layout)."""
    rows: Rows = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                rows.append({"text": text, "label": folder.name})
    return rows


def read_jsonl(path: Path) -> Rows:
    rows: Rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict):
            raise PetunerError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


FORMATS: dict[str, Callable[[Path], Rows]] = {
    "chatterbot_yaml": read_chatterbot,
    "label_folders": read_label_folders,
    "jsonl": read_jsonl,
}
ALL_FORMATS = (*FORMATS, "hf")


def read_rows(fmt: str, path_ref: str) -> Rows:
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}: allowed: {', '.join(ALL_FORMATS)}")
    path = Path(assets.resolve(str(path_ref))).expanduser()
    if not path.exists():
        raise PetunerError(f"data.path={path_ref!r}: {path} does not exist")
    if (fmt == "jsonl") != path.is_file():
        raise PetunerError(f"data.path={path_ref!r}: format {fmt} expects a "
                           f"{'file' if fmt == 'jsonl' else 'folder'}")
    rows = FORMATS[fmt](path)
    if not rows:
        raise PetunerError(f"data.path={path_ref!r}: no examples found in {path}")
    return rows


def load_source(src: Any) -> tuple[Dataset, str]:
    """The source's rows as a ``datasets.Dataset``, and how error lines name it."""
    if src.format == "hf":
        return hf.load(str(src.path), str(src.split), src.subset), str(src.path)
    rows = [as_json_text(row) for row in read_rows(src.format, src.path)]
    try:
        return Dataset.from_list(rows), str(src.path)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise PetunerError(f"data.path={src.path!r}: the rows do not share one schema ({first_line(err)})") from None
