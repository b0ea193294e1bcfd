"""Load base models and tokenizers: packaged assets, local folders, hub ids, or a random init.

``model.name_or_path`` may be ``asset:<name>`` (see ``petuner.assets``), a local folder, or a Hugging
Face hub id (for users with hub access). ``model.random_init`` builds a seeded, randomly initialised
model from a config dict instead, so tests get a reproducible tiny model in milliseconds.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from petuner import assets
from petuner.errors import ConfigError, PetunerError
from petuner.schema import choice, flag, number

TASKS = ("causal_lm", "seq_cls")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
# Heads that a sequence-classification model creates fresh: they always train (peft: modules_to_save).
SEQ_CLS_HEADS = ("classifier", "score")


@dataclass
class ModelSchema:
    """The ``model`` group's schema (``conf/model/*.yaml`` name it: ``- model_schema``)."""

    name_or_path: str | None = None  # asset:<name>, a local folder or a hub id
    tokenizer: str | None = None  # null: the model's own
    task: str = choice("causal_lm", TASKS)
    random_init: dict[str, Any] | None = None  # HF config fields of a seeded random model (instead of weights)
    init_seed: int = number(0, strict=False, integer=True)
    dtype: str = choice("float32", tuple(DTYPES))  # the weights' storage dtype
    adapter_dtype: str = choice("float32", tuple(DTYPES))  # the adapters' parameters (fp32 over any base)
    attn_implementation: str = choice("auto", ATTENTION)  # auto: sdpa where supported, else eager
    trust_remote_code: bool = flag(False)
    lora_targets: Any = "auto"  # the adapters' default target_modules; auto: the family's (petuner.families)


def auto_model_class(task: str) -> Any:
    import transformers

    return {"causal_lm": transformers.AutoModelForCausalLM,
            "seq_cls": transformers.AutoModelForSequenceClassification}[task]


def model_source(cfg: DictConfig) -> str | None:
    """The local path or hub id the base weights come from (None for a random init)."""
    if cfg.get("random_init"):
        return None
    if not cfg.get("name_or_path"):
        raise ConfigError("model.name_or_path is empty: give a local folder, a hub id or asset:<name>")
    source = assets.resolve(str(cfg.name_or_path))
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise PetunerError(f"model.name_or_path={cfg.name_or_path!r}: folder {path!r} does not exist")
    return source  # a hub id: needs hub access (HF_HUB_OFFLINE unset)


def load_tokenizer(cfg: DictConfig) -> Any:
    from transformers import AutoTokenizer

    ref = cfg.get("tokenizer") or cfg.get("name_or_path")
    if not ref:
        raise ConfigError("model.tokenizer is required when model.random_init is set")
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(str(ref)),
                                              trust_remote_code=bool(cfg.trust_remote_code))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: DictConfig, num_labels: int | None = None) -> Any:
    """The transformers config of the model ``cfg`` describes, without loading weights."""
    from transformers import AutoConfig

    extra: dict[str, Any] = {"num_labels": num_labels} if num_labels else {}
    if cfg.get("random_init"):
        fields = OmegaConf.to_container(cfg.random_init) if isinstance(cfg.random_init, DictConfig) \
            else dict(cfg.random_init)
        assert isinstance(fields, Mapping)
        fields = dict(fields)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ConfigError("model.random_init.model_type is required (e.g. llama, bert)")
        return AutoConfig.for_model(model_type, **fields, **extra)
    return AutoConfig.from_pretrained(model_source(cfg), trust_remote_code=bool(cfg.trust_remote_code),
                                      **extra)


def check_model_combination(cfg: DictConfig) -> None:
    """Keys that contradict each other: a random init has no weights to load from a path."""
    if cfg.random_init and cfg.name_or_path:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r} and model.random_init are both set: a random "
                          "init loads no weights; set model.random_init=null to load name_or_path "
                          "(or model.name_or_path=null)")
    if not cfg.random_init and not cfg.name_or_path:
        raise ConfigError("model.name_or_path is empty: give a local folder, a hub id or asset:<name>")
    if cfg.random_init and not cfg.tokenizer:
        raise ConfigError("model.tokenizer is required when model.random_init is set")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA only); "
                          "use sdpa")


def adapter_dtype(cfg: DictConfig) -> torch.dtype | None:
    """The dtype adapter parameters train in (``model.adapter_dtype``; fp32 unless set, also in runs
    saved before the key existed): fp32 over a bf16/fp16 base keeps updates below bf16's resolution."""
    return DTYPES.get(cfg.get("adapter_dtype", "float32"))


def attn_implementation(cfg: DictConfig, config: Any) -> str:
    """model.attn_implementation for this model (auto resolved; runs saved before the key existed used sdpa)."""
    from petuner.families import resolve_attention

    return resolve_attention(cfg.get("attn_implementation", "sdpa"), config, cfg.get("task", "causal_lm"))


def load_model(cfg: DictConfig, num_labels: int | None = None, *, meta: bool = False) -> nn.Module:
    """Build the base model on CPU (or on the meta device: structure only, for validation)."""
    auto = auto_model_class(cfg.task)
    config = model_config(cfg, num_labels)
    dtype, attention = DTYPES[cfg.dtype], {"attn_implementation": attn_implementation(cfg, config)}
    if meta:
        with torch.device("meta"):
            return auto.from_config(config, dtype=dtype)
    # Random init and fresh heads draw from the RNG: fork it so a run's own seed stream is untouched
    # and the same model config always gives the same weights (petuner.load rebuilds bases this way).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(cfg.init_seed))  # CPU only: CUDA's stays the run's
        if cfg.get("random_init"):
            model = auto.from_config(config, dtype=dtype, **attention)
        else:
            model = auto.from_pretrained(model_source(cfg), config=config, dtype=dtype, **attention,
                                         trust_remote_code=bool(cfg.trust_remote_code))
    return model


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Modules a task adds on top of the pretrained body; they always train."""
    if task != "seq_cls":
        return []
    names = dict(model.named_children())
    return [h for h in SEQ_CLS_HEADS if h in names]


def context_length(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)
