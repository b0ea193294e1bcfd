"""Data: raw rows (``sources``) → deterministic train/eval split → tokenized examples per task kind.

``data.kind`` picks the task module: ``sft`` (prompt/response, loss on the answer), ``text``
(language modelling blocks) or ``classification`` (text → label); ``auto`` reads it off the columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from petuner.checks import check_flag, check_number
from petuner.data import classification, sft, text
from petuner.data.packing import PACKABLE_KINDS
from petuner.data.sources import read_rows
from petuner.errors import ConfigError, PetunerError

KINDS = ("sft", "text", "classification")
COLUMNS = {"sft": ("prompt", "response"), "text": ("text",), "classification": ("text", "label")}
TASK_OF_KIND = {"sft": "causal_lm", "text": "causal_lm", "classification": "seq_cls"}


@dataclass
class DataBundle:
    kind: str
    train: Dataset
    eval: Dataset
    collate: Any
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) or None


def infer_kind(rows: list[dict[str, Any]]) -> str:
    keys = set(rows[0])
    for kind in ("sft", "classification", "text"):
        if set(COLUMNS[kind]) <= keys:
            return kind
    raise PetunerError(f"cannot tell the data kind from columns {sorted(keys)}: expected "
                       "{prompt, response}, {text, label} or {text}")


def check_data_cfg(cfg: Any, task: str | None = None, context: int | None = None) -> None:
    """Validate the data config before anything is read; task/context come from the model when known."""
    if cfg.kind not in (*KINDS, "auto"):
        raise ConfigError(f"data.kind={cfg.kind!r}: allowed: auto, {', '.join(KINDS)}")
    check_number(cfg, "max_length", "data", low=2, strict=False, integer=True)
    if context is not None and cfg.max_length > context:
        raise ConfigError(f"data.max_length={cfg.max_length} exceeds the model's context of {context} tokens")
    size = cfg.eval_size
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        raise ConfigError(f"data.eval_size={size!r}: a fraction in (0, 1) or a count >= 1")
    if cfg.kind != "auto" and task is not None and TASK_OF_KIND[cfg.kind] != task:
        raise ConfigError(f"data.kind={cfg.kind} needs a {TASK_OF_KIND[cfg.kind]} model, but model.task={task}")
    check_flag(cfg, "packing", "data")
    if cfg.packing and cfg.kind not in ("auto", *PACKABLE_KINDS):
        raise ConfigError(f"data.packing=true packs {', '.join(PACKABLE_KINDS)} examples, not data.kind={cfg.kind}")


def _check_columns(rows: list[dict[str, Any]], kind: str, where: str) -> None:
    for number, row in enumerate(rows, start=1):
        missing = [c for c in COLUMNS[kind] if c not in row or row[c] is None]
        if missing:
            raise PetunerError(f"{where}: example {number} lacks column {missing[0]!r} "
                               f"(data.kind={kind} needs {', '.join(COLUMNS[kind])})")


def build_data(cfg: Any, tokenizer: Any, task: str) -> DataBundle:
    datasets.disable_progress_bars()
    rows = read_rows(cfg.format, cfg.path)
    kind = infer_kind(rows) if cfg.kind == "auto" else cfg.kind
    if TASK_OF_KIND[kind] != task:
        raise ConfigError(f"data ({kind}) needs a {TASK_OF_KIND[kind]} model, but model.task={task}")
    _check_columns(rows, kind, f"data.path={cfg.path}")
    names = classification.label_names(rows) if kind == "classification" else []
    rows = [{c: row[c] for c in COLUMNS[kind]} for row in rows]
    size = cfg.eval_size if cfg.eval_size < 1 else int(cfg.eval_size)
    if len(rows) < 2 or (isinstance(size, int) and size >= len(rows)):
        raise PetunerError(f"data.path={cfg.path}: {len(rows)} examples cannot give data.eval_size={cfg.eval_size}")
    split = Dataset.from_list(rows).train_test_split(test_size=size, seed=int(cfg.split_seed))
    train, held_out = split["train"], split["test"]
    if cfg.get("limit"):
        train = train.select(range(min(int(cfg.limit), len(train))))
    if kind == "classification":
        train, held_out = (classification.build(d, tokenizer, cfg, names) for d in (train, held_out))
        collate = DataCollatorWithPadding(tokenizer)
    else:
        module = sft if kind == "sft" else text
        train, held_out = (module.build(d, tokenizer, cfg) for d in (train, held_out))
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=sft.IGNORE)
    if len(train) == 0 or len(held_out) == 0:
        raise PetunerError(f"data.path={cfg.path}: no usable examples after tokenization "
                           f"(train {len(train)}, eval {len(held_out)}); raise data.max_length?")
    return DataBundle(kind=kind, train=train, eval=held_out, collate=collate, label_names=names)
