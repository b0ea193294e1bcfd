"""Data: packaged corpora, the user's JSONL, deterministic splits, and SFT's answer-only loss mask."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from petuner import assets
from petuner.data import build_data
from petuner.data.sft import IGNORE
from petuner.data.sources import read_chatterbot, read_label_folders
from petuner.errors import PetunerError
from petuner.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer", "trust_remote_code": False}))


def data_cfg(**kw):
    base = {"name": "x", "format": "chatterbot_yaml", "kind": "sft", "path": "asset:chatterbot", "max_length": 128,
            "eval_size": 0.05, "split_seed": 0, "limit": None, "system_prompt": None}
    return OmegaConf.create({**base, **kw})


def test_packaged_corpora_are_real() -> None:
    pairs = read_chatterbot(Path(assets.resolve("asset:chatterbot")))
    assert len(pairs) > 2000 and all(p["prompt"] and p["response"] for p in pairs)
    news = read_label_folders(Path(assets.resolve("asset:bbc-news")))
    assert len(news) > 2200
    assert sorted({r["label"] for r in news}) == ["business", "entertainment", "politics", "sports", "tech"]


def test_sft_loss_covers_exactly_the_answer(tokenizer) -> None:
    bundle = build_data(data_cfg(limit=20), tokenizer, "causal_lm")
    example = bundle.train[0]
    ids, labels = example["input_ids"], example["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    prompt_text = tokenizer.decode(ids[:first])
    answer_text = tokenizer.decode([t for t in labels if t != IGNORE])
    assert prompt_text.startswith("<|im_start|>system") and prompt_text.endswith("<|im_start|>assistant\n")
    # The reply and its end-of-turn token carry the loss; the newline after it only separates turns.
    assert answer_text.endswith("<|im_end|>") and "<|im_start|>" not in answer_text
    assert labels[first:-1] == ids[first:-1] and labels[-1] == IGNORE and tokenizer.decode(ids[-1:]) == "\n"


def test_split_is_deterministic(tokenizer) -> None:
    a = build_data(data_cfg(), tokenizer, "causal_lm")
    b = build_data(data_cfg(), tokenizer, "causal_lm")
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["input_ids"] == b.eval["input_ids"]
    c = build_data(data_cfg(split_seed=1), tokenizer, "causal_lm")
    assert a.eval["input_ids"] != c.eval["input_ids"]
    assert 0.04 < len(a.eval) / (len(a.train) + len(a.eval)) < 0.06


def test_split_rows_are_disjoint_and_cover_the_data(tokenizer, tmp_path) -> None:
    """Every row is in exactly one split, told apart by a unique id in its text. Seen to fail with
    ``_split`` returning the unsplit rows as train (every eval row also trained on)."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "yes"}) + "\n" for i in range(100)))
    bundle = build_data(data_cfg(format="jsonl", kind="auto", path=str(path), eval_size=0.2), tokenizer, "causal_lm")

    def ids(split) -> list[str]:
        return [re.search(r"question \d+", tokenizer.decode(row))[0] for row in split["input_ids"]]

    train, held_out = ids(bundle.train), ids(bundle.eval)
    assert len(held_out) == 20 and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(f"question {i}" for i in range(100))


def test_text_blocks_and_classification(tokenizer) -> None:
    text = build_data(data_cfg(format="label_folders", kind="text", path="asset:bbc-news", max_length=64,
                               eval_size=20), tokenizer, "causal_lm")
    assert all(len(ids) == 64 for ids in text.train["input_ids"][:50])
    assert text.train[0]["labels"] == text.train[0]["input_ids"]
    cls = build_data(data_cfg(format="label_folders", kind="classification", path="asset:bbc-news",
                              eval_size=0.1), tokenizer, "seq_cls")
    assert cls.num_labels == 5 and set(cls.train["labels"]) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("rows, kind, task", [
    ([{"prompt": "hi", "response": "hello"}] * 10, "sft", "causal_lm"),
    ([{"text": "some words here"}] * 10, "text", "causal_lm"),
    ([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 5, "classification", "seq_cls"),
])
def test_jsonl_kind_is_read_from_columns(tokenizer, tmp_path, rows, kind, task) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = build_data(data_cfg(format="jsonl", kind="auto", path=str(path), eval_size=2), tokenizer, task)
    assert bundle.kind == kind and len(bundle.eval) >= 1


@pytest.mark.parametrize("content, message, task", [
    ("", "no examples found", "causal_lm"),
    ('{"prompt": "a"}\n' * 4, "cannot tell the data kind", "causal_lm"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "d.jsonl row 2: no value in column 'response'",
     "causal_lm"),
    ('{"prompt": "a", "response": "b"}\nnot json\n', r"d.jsonl:2: not valid JSON", "causal_lm"),
    ('{"text": "a", "label": -1}\n{"text": "b", "label": 0}\n', "label -1 is out of range", "seq_cls"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n', "needs a seq_cls model", "causal_lm"),
])
def test_bad_jsonl_is_one_clear_line(tokenizer, tmp_path, content, message, task) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(PetunerError, match=message) as err:
        build_data(data_cfg(format="jsonl", kind="auto", path=str(path), eval_size=1), tokenizer, task)
    assert "\n" not in str(err.value)
