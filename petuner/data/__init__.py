"""Data: each source's rows → columns and kind → deterministic train/eval split → cached tokenization → mixture.

``data.kind`` picks the task module: ``chat``/``sft`` (conversations and instruction rows, loss on the
assistant's replies), ``text`` (language modelling blocks) or ``classification`` (text → label);
``auto`` reads it off the columns. ``data.sources`` lists several sources, each with the top-level
keys as defaults; their training sets are mixed, their held-out sets kept apart and also combined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, concatenate_datasets
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from petuner.checks import check_number
from petuner.data import classification, columns, preference, sft, text, unpaired
from petuner.data.cache import cached_map, tokenizer_hash
from petuner.data.mixture import mix
from petuner.data.report import loss_per_row, split_stats
from petuner.data.schema import KINDS, TASKS_OF_KIND
from petuner.data.sources import ALL_FORMATS, load_source
from petuner.errors import ConfigError, PetunerError

log = logging.getLogger(__name__)
SOURCE_KEYS = ("name", "format", "path", "kind", "split", "subset", "columns", "weight", "eval_size", "limit",
               "system_prompt")
# Keys older configs (and saved runs) may lack, with the value that reproduces what they did.
DEFAULTS = {"split": "train", "subset": None, "columns": None, "weight": 1.0, "system_prompt": None,
            "train_on": "assistant", "truncation": "drop_turns", "sources": None, "mix": "concat",
            "stopping_strategy": "first_exhausted", "limit": None}


@dataclass
class DataBundle:
    kind: str
    train: Dataset
    eval: Dataset  # every source's held-out examples together
    collate: Any
    label_names: list[str] = field(default_factory=list)
    evals: dict[str, Dataset] = field(default_factory=dict)  # held-out examples per source
    trains: dict[str, Dataset] = field(default_factory=dict)  # training examples per source, before mixing
    report: dict[str, Any] = field(default_factory=dict)  # counts per source and split (run.json's "data")

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) or None

    def set_evals(self, evals: dict[str, Dataset]) -> None:
        """Each source's held-out examples, with ``eval`` kept as all of them together (each source's rows as
        they are, so per-source figures stay exact)."""
        self.evals = evals
        self.eval = concatenate_datasets(list(evals.values())) if len(evals) > 1 else next(iter(evals.values()))


def setting(cfg: Any, key: str) -> Any:
    return cfg.get(key, DEFAULTS.get(key))


def source_configs(cfg: Any) -> list[DictConfig]:
    """One config per source: ``data.sources`` entries over the top-level keys, or the data config itself."""
    base = {k: setting(cfg, k) for k in SOURCE_KEYS if k not in ("name", "weight")}
    shared = {k: setting(cfg, k) for k in ("max_length", "split_seed", "train_on", "truncation")}
    entries = setting(cfg, "sources") or [{"name": cfg.name}]
    out = []
    for i, entry in enumerate(entries):
        where = f"data.sources[{i}]" if setting(cfg, "sources") else "data"
        if not isinstance(entry, (dict, DictConfig)):
            raise ConfigError(f"{where}={entry!r}: each source is a mapping of {', '.join(SOURCE_KEYS)}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(SOURCE_KEYS)})")
        own = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else dict(entry)
        src = OmegaConf.create({**base, "weight": 1.0, **own, **shared})
        if src.path is None:
            raise ConfigError(f"{where}.path: must be set (a file, a folder, a hub id or asset:<name>)")
        src.name = str(src.get("name") or Path(str(src.path)).stem)
        out.append(src)
    return out


def _check_source(src: DictConfig, where: str, task: str | None) -> None:
    if src.format not in ALL_FORMATS:
        raise ConfigError(f"{where}.format={src.format!r}: allowed: {', '.join(ALL_FORMATS)}")
    if src.kind not in (*KINDS, "auto"):
        raise ConfigError(f"{where}.kind={src.kind!r}: allowed: auto, {', '.join(KINDS)}")
    if src.kind != "auto" and task is not None and task not in TASKS_OF_KIND[src.kind]:
        raise ConfigError(f"{where}.kind={src.kind} needs a {' or '.join(TASKS_OF_KIND[src.kind])} model, "
                          f"but model.task={task}")
    size = src.eval_size
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        raise ConfigError(f"{where}.eval_size={size!r}: a fraction in (0, 1) or a count >= 1")
    check_number(src, "weight", where, low=0)
    if src.format != "hf" and (src.split != DEFAULTS["split"] or src.subset is not None):
        raise ConfigError(f"{where}.split/subset apply to format=hf, not to format={src.format}")
    check_number(src, "limit", where, low=1, strict=False, integer=True, optional=True)
    cols = src.columns
    if cols is not None and (not isinstance(cols, DictConfig) or not all(isinstance(v, str) for v in cols.values())):
        raise ConfigError(f"{where}.columns={cols!r}: a mapping {{petuner column: your column}}, "
                          "e.g. {prompt: question, response: answer}")
    bad = sorted(set(cols or {}) - set(columns.NAMES))
    if bad:
        raise ConfigError(f"{where}.columns.{bad[0]}: unknown petuner column (allowed: {', '.join(columns.NAMES)})")


def check_sources(cfg: Any, task: str | None = None) -> None:
    """What the data schema's fields alone cannot say: each source's keys (``data.sources`` entries over
    the top-level ones) against each other and the model's task, and mixture keys only with a mixture."""
    sources = setting(cfg, "sources")
    if sources is not None and not isinstance(sources, (list, ListConfig)):
        raise ConfigError(f"data.sources={sources!r}: a list of sources (null or [] for data.path alone)")
    configs = source_configs(cfg)
    for i, src in enumerate(configs):
        _check_source(src, f"data.sources[{i}]" if sources else "data", task)
    names = [src.name for src in configs]
    if len(set(names)) < len(names):
        raise ConfigError(f"data.sources: two sources are named {max(names, key=names.count)!r}; set their name keys")
    for key in ("mix", "stopping_strategy"):  # nothing the user sets is silently ignored
        if not sources and setting(cfg, key) != DEFAULTS[key]:
            raise ConfigError(f"data.{key}={setting(cfg, key)} applies to a mixture (data.sources), not to one source")
    if setting(cfg, "mix") == "concat" and setting(cfg, "stopping_strategy") != DEFAULTS["stopping_strategy"]:
        raise ConfigError(f"data.stopping_strategy={setting(cfg, 'stopping_strategy')} applies to data.mix=interleave")


@dataclass
class Built:
    name: str
    kind: str
    splits: dict[str, Dataset]
    label_names: list[str]
    report: dict[str, Any]


def _tokenize(dataset: Dataset, kind: str, form: str | None, tokenizer: Any, src: DictConfig, names: list[str],
              key: Any, where: str) -> Dataset:
    if kind == "classification":
        return classification.build(dataset, tokenizer, src, names, key)
    if kind == "text":
        return text.build(dataset, tokenizer, src, key)
    settings = [key, form, src.max_length, src.train_on, src.truncation, src.system_prompt]
    if kind == "preference":
        return cached_map(dataset, preference.build_pair_fn(tokenizer, src, where), "preference", settings,
                          remove_columns=dataset.column_names)
    if kind == "unpaired":
        return cached_map(dataset, unpaired.build_unpaired_fn(tokenizer, src, where), "unpaired", settings,
                          remove_columns=dataset.column_names)
    return cached_map(dataset, sft.build_fn(tokenizer, src, form, where), "sft", settings,
                      remove_columns=dataset.column_names)


def _finish(tokenized: Dataset, kind: str, where: str) -> tuple[Dataset, dict[str, Any]]:
    """Drop the examples with nothing to learn (a reply cut away; a pair without preference), count what
    truncation did."""
    truncated = np.asarray(tokenized.data.column("truncated").to_numpy(zero_copy_only=False), dtype=bool)
    dataset = tokenized.remove_columns("truncated")
    useful = loss_per_row(dataset, kind) > 0
    counts = {}
    if kind == "preference":
        ties = np.asarray(dataset.data.column("tie").to_numpy(zero_copy_only=False), dtype=bool)
        dataset = dataset.remove_columns("tie")
        if ties.any():
            log.warning("%s: %d pairs have identical chosen and rejected replies: dropped (a tie carries no "
                        "preference; its DPO gradient is zero)", where, int(ties.sum()))
        useful &= ~ties
        counts["ties"] = int(ties.sum())
    keep = np.flatnonzero(useful)
    if len(keep) < len(dataset):
        dataset = dataset.select(keep, keep_in_memory=True)
    counts.update(truncated=int(truncated[keep].sum()), dropped=len(tokenized) - len(keep))
    return dataset, {**split_stats(dataset, kind), **counts}


def _split(raw: Dataset, src: DictConfig, where: str) -> dict[str, Dataset]:
    size = src.eval_size if src.eval_size < 1 else int(src.eval_size)
    if len(raw) < 2 or (isinstance(size, int) and size >= len(raw)):
        raise PetunerError(f"{where}: {len(raw)} examples cannot give data.eval_size={src.eval_size}")
    parts = raw.train_test_split(test_size=size, seed=int(src.split_seed))
    train = parts["train"]
    if src.limit:
        train = train.select(range(min(int(src.limit), len(train))), keep_in_memory=True)
    return {"train": train, "eval": parts["test"]}


def build_source(src: DictConfig, tokenizer: Any, task: str, key: str, check_kind: Any = None,
                 alone: bool = True) -> Built:
    raw, where = load_source(src)
    raw, kind, form = columns.prepare(raw, src.kind, where, src.columns)
    if check_kind is not None:
        check_kind(kind)  # the objective's word on this kind of data, before anything is tokenized
    if task not in TASKS_OF_KIND[kind]:
        raise ConfigError(f"data ({kind}) needs a {' or '.join(TASKS_OF_KIND[kind])} model, but model.task={task}")
    if kind not in columns.CONVERSATION_KINDS:  # pairs are conversations whose completion always carries the loss
        for k in ("train_on",) if kind in ("preference", "unpaired") else ("train_on", "truncation", "system_prompt"):
            if src[k] != DEFAULTS[k]:
                raise ConfigError(f"data.{k}={src[k]} applies to conversations, not to {kind} data ({where})")
    if kind == "unpaired":  # the labels' type; and KTO needs both classes (a mixture's: checked together)
        unpaired.check_classes(raw["label"], where, both=alone)
    names = columns.label_names(raw) if kind == "classification" else []
    if task == "seq_cls" and kind == "preference":
        names = ["reward"]  # a reward model: one output, its score
    splits, report = {}, {"kind": kind, "where": where, "weight": float(src.weight)}
    for split, rows in _split(raw, src, where).items():
        splits[split], report[split] = _finish(_tokenize(rows, kind, form, tokenizer, src, names, key, where), kind,
                                               f"{where} ({split})")
        if len(splits[split]) == 0:
            raise PetunerError(f"{where}: no usable {split} examples after tokenization "
                               f"({report[split]['dropped']} dropped); raise data.max_length?")
    return Built(src.name, kind, splits, names, report)


def build_data(cfg: Any, tokenizer: Any, task: str, check_kind: Any = None) -> DataBundle:
    """Every source read, checked, split, tokenized (cached) and mixed; ``check_kind`` (the objective's)
    refuses a source's kind of data before it is tokenized."""
    datasets.disable_progress_bars()
    key = tokenizer_hash(tokenizer)
    sources = source_configs(cfg)
    built = [build_source(src, tokenizer, task, key, check_kind, alone=len(sources) == 1) for src in sources]
    if len(built) > 1 and any(b.kind == "unpaired" for b in built):
        unpaired.check_classes([bool(v) for b in built if b.kind == "unpaired" for v in b.splits["train"]["desirable"]],
                               "data.sources (train)")
    if len({tuple(b.label_names) for b in built}) > 1:
        raise PetunerError("data.sources: classification sources must share their labels, "
                           f"got {[b.label_names for b in built]}")
    report: dict[str, Any] = {"sources": {b.name: b.report for b in built}}
    if len(built) == 1:
        train = built[0].splits["train"]
    else:
        train, counts = mix([b.splits["train"] for b in built], [b.report["weight"] for b in built],
                            setting(cfg, "mix"), setting(cfg, "stopping_strategy"), int(cfg.split_seed))
        for b, count in zip(built, counts, strict=True):
            b.report["mixed_train_examples"] = count
        report["mix"] = setting(cfg, "mix")
    evals = {b.name: b.splits["eval"] for b in built}
    held_out = concatenate_datasets(list(evals.values())) if len(evals) > 1 else built[0].splits["eval"]
    kind = "+".join(dict.fromkeys(b.kind for b in built))
    if kind == "classification":
        collate = DataCollatorWithPadding(tokenizer)
    elif kind == "preference":
        collate = preference.PairCollator(tokenizer.pad_token_id)
    elif kind == "unpaired":
        collate = None  # KTO's rows, each with its KL row, and their collator: set by loss=kto (prepare_data)
    else:
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=sft.IGNORE)
    report.update(train_examples=len(train), eval_examples=len(held_out))
    return DataBundle(kind=kind, train=train, eval=held_out, collate=collate, label_names=built[0].label_names,
                      evals=evals, trains={b.name: b.splits["train"] for b in built}, report=report)
