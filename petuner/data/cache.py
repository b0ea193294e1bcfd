"""Tokenization through ``datasets.map`` with a cache keyed by data + tokenizer + settings.

``datasets`` caches a map only for datasets backed by its own cache files; rows read in memory (the
packaged corpora, petuner's JSONL reader) have none. So every map here names its cache file and its
output fingerprint itself, from the input's fingerprint (a hash of its content, or of the files it
was loaded from), a hash of the tokenizer (vocabulary, special tokens, chat template) and the
settings that change the result. The same data, tokenizer and settings then load the earlier result
instead of tokenizing again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher

import petuner

CACHE_VERSION = 1  # bump when the tokenization code changes what it writes


def cache_dir() -> Path | None:
    """Where tokenized data is kept: $PETUNER_DATA_CACHE, else under the ``datasets`` cache; None if caching is off."""
    if not datasets.is_caching_enabled():
        return None
    return Path(os.environ.get("PETUNER_DATA_CACHE") or Path(datasets.config.HF_DATASETS_CACHE) / "petuner")


def tokenizer_hash(tokenizer: Any) -> str:
    return Hasher.hash([tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False)
                        else tokenizer.get_vocab(), str(tokenizer.special_tokens_map),
                        getattr(tokenizer, "chat_template", None)])


def cached_map(dataset: datasets.Dataset, function: Any, stage: str, key: Any, **kwargs: Any) -> datasets.Dataset:
    """``dataset.map(function)``, loaded from the cache when this stage already ran on the same input and key."""
    fingerprint = Hasher.hash([petuner.__version__, CACHE_VERSION, stage, dataset._fingerprint, key])
    folder = cache_dir()
    if folder is None:
        return dataset.map(function, new_fingerprint=fingerprint, keep_in_memory=True, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    return dataset.map(function, new_fingerprint=fingerprint, load_from_cache_file=True,
                       cache_file_name=str(folder / f"{stage}-{fingerprint}.arrow"), **kwargs)
