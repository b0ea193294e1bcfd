"""Mixtures end to end: the shipped ``data=mixture`` trains and reports each source; a packed mixture
evaluates each source to the same figures as unpacked."""

from __future__ import annotations

import pytest
import torch

from petuner.data import build_data
from petuner.data.packing import attend_within_examples, pack_bundle
from petuner.models import load_model, load_tokenizer
from petuner.run import run
from petuner.train.loop import evaluate
from tests.test_eval_reports import chats_file


def test_shipped_mixture_trains_and_scores_each_source(cfg_factory) -> None:
    # Seen failing before 380fa9c: KeyError 'sft+text' in check_objective.
    info = run(cfg_factory("data=mixture", "data.limit=16", "data.eval_size=8", "data.sources.1.eval_size=2",
                           "trainer.max_steps=4"))
    results, sources = info["results"], info["data"]["sources"]
    assert info["data_kind"] == "sft+text" and set(sources) == {"chatterbot", "bbc_text"}
    assert sources["chatterbot"]["mixed_train_examples"] == 3 * sources["chatterbot"]["train"]["examples"] == 48
    assert info["train_examples"] == 48 + sources["bbc_text"]["mixed_train_examples"]
    for when in ("before", "after"):
        tokens = {n: s["eval"]["loss_tokens"] for n, s in sources.items()}
        combined = sum(results[f"eval/{n}/loss_{when}"] * c for n, c in tokens.items()) / sum(tokens.values())
        assert results[f"eval/loss_{when}"] == pytest.approx(combined, rel=1e-6)
    assert results["eval/loss_after"] < results["eval/loss_before"]


def test_a_packed_mixture_evaluates_each_source_as_unpacked(cfg_factory, tmp_path) -> None:
    # Seen failing before #29: KeyError 'position_ids' (each source's held-out set was left unpacked).
    sources = ("data.sources=[{name:chatterbot,format:chatterbot_yaml,path:'asset:chatterbot',kind:sft},"
               f"{{name:chats,path:'{chats_file(tmp_path / 'chats.jsonl')}',kind:chat}}]")
    cfg = cfg_factory("data=mixture", sources, "data.limit=8", "data.eval_size=6", "data.max_length=160",
                      "+model.random_init.initializer_range=0.2")
    tokenizer = load_tokenizer(cfg.model)
    plain = build_data(cfg.data, tokenizer, "causal_lm")
    packed = pack_bundle(build_data(cfg.data, tokenizer, "causal_lm"), tokenizer, 160, 0)
    model = load_model(cfg.model)
    attend_within_examples(model)  # a no-op on unpacked batches (no position_ids)
    want, got = (evaluate(model, data, 4, torch.device("cpu"), None) for data in (plain, packed))
    assert all(len(packed.evals[n]) < len(plain.evals[n]) == 6 for n in ("chatterbot", "chats"))
    assert len(packed.eval) == sum(len(e) for e in packed.evals.values())
    assert {"eval/loss", "eval/chatterbot/loss", "eval/chats/loss"} <= set(got) and set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert abs(got["eval/chatterbot/loss"] - got["eval/chats/loss"]) > 0.01  # two sources, two different figures


def test_packing_a_mixture_with_a_text_source_is_refused_before_reading_data(cfg_factory) -> None:
    from petuner.config import validate
    from petuner.errors import ConfigError

    message = r"^data.packing=true packs chat, sft examples, not data.sources\[1\].kind=text$"
    with pytest.raises(ConfigError, match=message):
        validate(cfg_factory("data=mixture", "data.packing=true"))
