"""Plain-text language modelling: documents are tokenized, joined with EOS and cut into blocks.

Splitting train/eval happens on documents before this, so no block straddles the split.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from petuner.data.cache import cached_map


def build(dataset: Any, tokenizer: Any, cfg: Any, key: Any) -> Any:
    block = int(cfg.max_length)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = tokenizer([str(t) for t in batch["text"]], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + eos for doc in ids]}

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[Any]]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block * block or len(stream)  # keep a short remainder only if alone
        blocks = [stream[i:i + block] for i in range(0, usable, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
                "labels": [list(b) for b in blocks], "truncated": [0] * len(blocks)}

    tokenized = cached_map(dataset, tokenize, "text", key, batched=True, remove_columns=dataset.column_names)
    return cached_map(tokenized, group, "blocks", block, batched=True, batch_size=1000)
