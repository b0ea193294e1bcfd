"""``petuner eval``: ``--split all`` on a mixture scores every example of every source, and each scoring
(checkpoint, split) keeps its own report file."""

from __future__ import annotations

import json

import pytest
import torch

import petuner
from petuner.cli import main
from petuner.data import build_data
from petuner.data.sft import IGNORE
from petuner.evaluate import eval_data_cfg, evaluate_run
from tests.test_after_training import DATA, copy_run


def chats_file(path) -> str:
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}, " + "so it is. " * (i % 4)}]}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mixture(tmp_path) -> list[str]:
    """Two sources, chatterbot weighted 3: a weight must not make an example count three times."""
    return ["data=mixture", "data.eval_size=4", "data.max_length=64",
            "data.sources=[{name:chatterbot,format:chatterbot_yaml,path:'asset:chatterbot',kind:sft,limit:16,weight:3},"
            f"{{name:chats,path:'{chats_file(tmp_path / 'chats.jsonl')}',kind:chat}}]"]


@torch.no_grad()
def loss_sums(model, examples) -> tuple[float, int]:
    """Σ cross-entropy over an example set's labelled next tokens, one example at a time, by hand."""
    total, count = 0.0, 0
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total, count


def test_split_all_on_a_mixture_is_every_example_token_weighted(trained_run, tmp_path) -> None:
    # Seen failing before #29: it scored the 8 held-out examples only (eval/loss as --split eval).
    run_dir = copy_run(trained_run, tmp_path / "run")
    overrides = mixture(tmp_path)
    _, report = evaluate_run(run_dir, overrides, split="all")
    model, tokenizer = petuner.load(run_dir)
    data = build_data(eval_data_cfg(overrides), tokenizer, "causal_lm")
    assert len(data.train) == 3 * 16 + 12  # the mixture repeats chatterbot; --split all does not
    sums = {name: loss_sums(model, [*data.trains[name], *data.evals[name]]) for name in ("chatterbot", "chats")}
    assert report["examples"] == 16 + 4 + 12 + 4
    for name, (total, count) in sums.items():
        assert report[f"eval/{name}/loss"] == pytest.approx(total / count, abs=2e-6), name
    combined = sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())
    assert report["eval/loss"] == pytest.approx(combined, abs=2e-6)


def test_two_checkpoints_keep_their_own_reports(trained_run, tmp_path, capsys) -> None:
    # Seen failing before #29: every call wrote eval-chatterbot.json over the last one. (--split all adds -all:
    # tests/test_after_training.py's eval-faq-all.json.)
    run_dir = copy_run(trained_run, tmp_path / "run")
    calls = {"eval-chatterbot.json": [], "eval-chatterbot-step-3.json": ["--checkpoint", "step-00000003"]}
    for name, extra in calls.items():
        assert main(["eval", str(run_dir), *DATA, *extra]) == 0
        assert capsys.readouterr().out.strip().endswith(name)
    reports = {name: json.loads((run_dir / name).read_text()) for name in calls}
    assert [r["checkpoint"] for r in reports.values()] == ["last", "step-00000003"]
    assert len({r["eval/loss"] for r in reports.values()}) == 2  # two different scorings, both kept
