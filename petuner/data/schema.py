"""The ``data`` group's schema (every ``conf/data/*.yaml`` names it: ``- data_schema``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petuner.checks import shown
from petuner.data.mixture import MIXES, STOPPING
from petuner.data.packing import PACKABLE_KINDS
from petuner.data.sft import TRAIN_ON, TRUNCATION
from petuner.data.sources import ALL_FORMATS
from petuner.errors import ConfigError
from petuner.schema import checked, choice, flag, number

KINDS = ("chat", "sft", "text", "classification", "preference", "unpaired")
# The model tasks each kind of data trains (preference pairs: a policy, or a reward model's classifier;
# unpaired completions: KTO's policy).
TASKS_OF_KIND = {"chat": ("causal_lm",), "sft": ("causal_lm",), "text": ("causal_lm",),
                 "classification": ("seq_cls",), "preference": ("causal_lm", "seq_cls"),
                 "unpaired": ("causal_lm",)}



def check_eval_size(cfg: Any, key: str, group: str) -> None:
    size = cfg.get(key)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        raise ConfigError(f"{group}.{key}={shown(size)}: a fraction in (0, 1) or a count >= 1")


@dataclass
class DataSchema:
    name: str = ""
    format: str = choice("jsonl", ALL_FORMATS)
    kind: str = choice("auto", ("auto", *KINDS))  # auto: read off the columns
    path: str | None = None  # a file or folder, or asset:<name>
    max_length: int = number(256, low=2, strict=False, integer=True)  # longer examples are truncated
    eval_size: float = checked(0.05, check_eval_size)  # fraction (<1) or count (>=1) held out
    split_seed: int = number(0, strict=False, integer=True)
    limit: int | None = number(None, low=1, strict=False, integer=True, optional=True)
    system_prompt: str | None = None  # sft only; null: the chat template's default
    split: str = "train"  # format=hf: the split to read
    subset: str | None = None  # format=hf: the hub dataset's subset (configuration) name
    # {petuner column: your column}, e.g. {prompt: question, response: answer} (checked with the sources)
    columns: Any = None
    train_on: str = choice("assistant", TRAIN_ON)  # conversations: which turns carry the loss
    truncation: str = choice("drop_turns", TRUNCATION)  # conversations over max_length
    sources: Any = None  # a list of sources to mix, each a mapping over these keys (+ name, weight)
    mix: str = choice("concat", MIXES)  # concat (each scaled by its weight) | interleave
    stopping_strategy: str = choice("first_exhausted", STOPPING)  # interleave only
    packing: bool = flag(False)  # sft: whole examples packed into rows of max_length, attention kept within each


def check_max_length(cfg: Any, context: int | None) -> None:
    """max_length against the model's context (known once the model's config is read)."""
    if context is not None and cfg.max_length > context:
        raise ConfigError(f"data.max_length={cfg.max_length} exceeds the model's context of {context} tokens")


def check_data_combination(cfg: Any, task: str | None = None) -> None:
    """What one key alone cannot say: a path where the format needs one, the kind against the model's task."""
    from petuner.data import check_sources, source_configs

    if cfg.path is None and not cfg.sources:
        raise ConfigError(f"data.path is not set: data={cfg.name} needs data.path=... (a file, a folder, a hub id "
                          "or asset:<name>)")
    check_sources(cfg, task)  # each source's kind against the model's task, and what sources may set
    for i, src in enumerate(source_configs(cfg) if cfg.packing else []):  # every source of a mixture is packed
        if src.kind not in ("auto", *PACKABLE_KINDS):
            where = f"data.sources[{i}].kind" if cfg.sources else "data.kind"
            raise ConfigError(f"data.packing=true packs {', '.join(PACKABLE_KINDS)} examples, not {where}={src.kind}")
    if cfg.system_prompt is not None and cfg.kind in ("text", "classification"):
        raise ConfigError(f"data.system_prompt is set but data.kind={cfg.kind} has no chat turns: "
                          "it applies to sft data only (set data.system_prompt=null)")
