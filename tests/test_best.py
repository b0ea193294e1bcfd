"""Best checkpoint and early stopping: a forced overfit stops after the patience, ``best/`` holds the
minimum-loss evaluation's weights, and a SIGKILLed run resumes to the same decisions and files."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from petuner.errors import ConfigError
from petuner.export import export
from petuner.run import run
from petuner.train.logging import read_metrics

# 8 training examples, a high learning rate, an evaluation after every step: held-out loss soon rises.
OVERFIT = ("data.limit=8", "optimizer.lr=5e-2", "trainer.max_steps=30", "trainer.eval_every=1",
           "trainer.early_stopping_patience=3", "trainer.save_every=1", "trainer.keep_checkpoints=100")


def eval_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["eval/loss"] for m in read_metrics(run_dir) if "eval/loss" in m}


def test_early_stopping_keeps_the_minimum_loss_weights(cfg_factory, tmp_path) -> None:
    info = run(cfg_factory(*OVERFIT))
    run_dir = tmp_path / "run"
    losses = eval_losses(run_dir)
    best_step = min(losses, key=losses.get)
    stop = max(losses)
    assert stop == best_step + 3 < 30  # three evaluations without improvement, then stop
    assert info["steps"] == stop and info["results"]["early_stopping/step"] == stop
    assert all(losses[s] >= losses[best_step] for s in losses)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["eval/loss"] == losses[best_step]
    saved = load_file(run_dir / "best" / "adapter.safetensors")
    at_best = load_file(run_dir / "checkpoints" / f"step-{best_step:08d}" / "adapter.safetensors")
    final = load_file(run_dir / "adapter.safetensors")
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert any(not torch.equal(saved[k], final[k]) for k in saved)  # the last weights are not the best ones


def test_export_checkpoint_best_last_and_step(cfg_factory, tmp_path) -> None:
    import petuner

    run(cfg_factory(*OVERFIT))
    run_dir = tmp_path / "run"
    best_step = json.loads((run_dir / "best" / "best.json").read_text())["step"]
    ids = torch.tensor([[1, 2, 3, 4]])

    def logits(**kwargs):
        with torch.no_grad():
            return petuner.load(run_dir, **kwargs)[0](input_ids=ids).logits

    assert torch.equal(logits(checkpoint="best"), logits(checkpoint=f"step-{best_step}"))
    assert not torch.equal(logits(checkpoint="best"), logits(checkpoint="last"))
    merged = export(run_dir, "merged", tmp_path / "merged", checkpoint="best")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    assert (theirs - logits(checkpoint="best")).abs().max() <= 1e-4


def test_without_patience_the_run_trains_to_the_end_and_keeps_best(cfg_factory, tmp_path) -> None:
    info = run(cfg_factory(*OVERFIT[:-3], "trainer.max_steps=8"))
    assert info["steps"] == 8 and "early_stopping/step" not in info["results"]
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == info["results"]["best/step"]


@pytest.mark.parametrize("override, message", [
    ("trainer.early_stopping_patience=-1", "trainer.early_stopping_patience=-1: must be an integer >= 1 or null"),
    ("trainer.early_stopping_min_delta=-0.1", "trainer.early_stopping_min_delta=-0.1: must be a number >= 0"),
    ("objective=eval/acc", "objective='eval/acc': allowed: eval/loss, eval/perplexity, eval/accuracy"),
])
def test_bad_early_stopping_values_are_one_line_before_anything_is_written(cfg_factory, tmp_path, override,
                                                                           message) -> None:
    with pytest.raises(ConfigError) as err:
        run(cfg_factory("trainer.eval_every=1", override))
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


def test_patience_without_evaluations_is_one_line(cfg_factory) -> None:
    with pytest.raises(ConfigError, match=r"needs evaluations: set trainer\.eval_every"):
        run(cfg_factory("trainer.early_stopping_patience=2"))


# Every shipped data config, each kind and the mixed kind (data=mixture is sft+text): the objective is
# checked against the model's task with the config, before any data is read or anything is written.
# Keyed by data kind, the check raised KeyError for chat and sft+text in every run.
@pytest.mark.parametrize("data, model, measured, unmeasured", [
    ("chatterbot", "tiny_llama", ("eval/loss", "eval/perplexity"), "eval/accuracy"),
    ("chat", "tiny_llama", ("eval/loss", "eval/perplexity"), "eval/accuracy"),
    ("bbc_text", "tiny_llama", ("eval/loss", "eval/perplexity"), "eval/accuracy"),
    ("mixture", "tiny_llama", ("eval/loss", "eval/perplexity"), "eval/accuracy"),
    ("bbc_news", "tiny_bert", ("eval/loss", "eval/accuracy"), "eval/perplexity"),
])
def test_objective_check_covers_every_data_kind(cfg_factory, tmp_path, data, model, measured, unmeasured) -> None:
    from petuner.config import validate

    overrides = (f"model={model}", f"data={data}", "data.path=unused.jsonl" if data == "chat" else "data.limit=8")
    for objective in measured:
        validate(cfg_factory(*overrides, f"objective={objective}"))
    with pytest.raises(ConfigError) as err:
        run(cfg_factory(*overrides, "trainer.eval_every=1", f"objective={unmeasured}"))
    task = "causal_lm" if model == "tiny_llama" else "seq_cls"
    assert str(err.value) == (f"objective={unmeasured} is not measured for model.task={task}; "
                              f"allowed: {', '.join(measured)}")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigkilled_early_stopping_run_resumes_to_the_same_result(tmp_path) -> None:
    from tests.test_kill import command, env, steps_logged, train_killed

    extra = tuple(o for o in OVERFIT if not o.startswith("trainer.keep"))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run(command(straight, *extra), env=env(), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed.mkdir()
    stop = max(eval_losses(straight))
    for when in (3, stop - 1):  # before the best evaluation, and after it (best/ already written)
        assert train_killed(resumed, extra, lambda d, n=when: steps_logged(d) >= n)
    done = subprocess.run(command(resumed, *extra, "trainer.resume=true"), env=env(), cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert eval_losses(resumed) == eval_losses(straight)
    for name in ("adapter.safetensors", "best/adapter.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((resumed / "best" / "best.json").read_text()) == \
        json.loads((straight / "best" / "best.json").read_text())
    again = subprocess.run(command(resumed, *extra, "trainer.resume=true"), env=env(), cwd=tmp_path,
                           capture_output=True, text=True)  # resuming a stopped run trains no further
    assert again.returncode == 0 and max(eval_losses(resumed)) == stop



def test_resume_may_switch_evaluations_on(cfg_factory, tmp_path) -> None:
    run(cfg_factory("trainer.max_steps=3"))
    info = run(cfg_factory("trainer.eval_every=1", "trainer.max_steps=6", "trainer.resume=true"))
    assert info["steps"] == 6 and (tmp_path / "run" / "best" / "best.json").is_file()
