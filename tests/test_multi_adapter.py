"""Several runs on one base at inference: a mixed batch routed per prompt through peft's adapter_names gives
each run's own answer (and the base's for "base"); an unknown adapter name is one line."""

from __future__ import annotations

import json

import pytest

from petuner.cli import main
from petuner.generate import Sampling, load_generator
from petuner.merge import merge_runs
from petuner.multi_adapter import load_multi

PROMPTS = ["What is your name?", "Tell me about Python.", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def louder(varied_run, tmp_path_factory):
    """A second run on varied_run's base: its update times 3 (a merge, no training)."""
    return merge_runs([varied_run], tmp_path_factory.mktemp("louder") / "run", weights=[3.0])


def test_mixed_batch_gives_each_runs_own_answers(varied_run, louder) -> None:
    from petuner.adapters import disabled_adapters

    sampling = Sampling(max_new_tokens=6)
    gen = load_multi(varied_run, {"louder": louder})
    routes = ["default", "louder", "base"]
    mixed = gen.answer(PROMPTS, sampling, adapter_names=routes)
    single, loud = load_generator(varied_run), load_generator(louder)
    expected = [single.answer(PROMPTS[:1], sampling)[0], loud.answer(PROMPTS[1:2], sampling)[0]]
    with disabled_adapters(single.model):
        expected.append(single.answer(PROMPTS[2:], sampling)[0])
    assert mixed == expected
    # each route really differs on the same prompt, so the routing is what the comparison checks
    assert len({gen.answer(PROMPTS[:1], sampling, adapter_names=[r])[0] for r in routes}) == 3


def test_unknown_adapter_in_a_prompt_file_is_one_line_exit_2(varied_run, louder, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "adapter": "louder"}) + "\n" +
                       json.dumps({"prompt": "hi", "adapter": "news"}) + "\n")
    argv = ["generate", str(varied_run), "--adapter", f"louder={louder}", "--file", str(prompts),
            "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: prompt 2: adapter 'news' is not loaded; allowed: default, louder, base"
    assert not (tmp_path / "a.jsonl").exists()
