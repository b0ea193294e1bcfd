"""What a resume may change: a longer run continues on the new length's schedule; settings that decide what a
step computes are refused in one line; bookkeeping may change and the weights stay bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_scheduler

from petuner.errors import PetunerError
from petuner.optim.schema import SCHEDULES
from petuner.run import run
from petuner.train.checkpoint import checkpoints
from petuner.train.logging import read_metrics
from tests.conftest import Crash, crash_after_first_checkpoint

# The run: 4 steps of 2 x 4 examples, warmup 2, then extended to 8.
EXTEND = ("optimizer.lr=1e-2", "optimizer.warmup_steps=2", "trainer.batch_size=4", "trainer.grad_accum=2",
          "trainer.save_every=2")


def logged(run_dir, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir) if key in m]


def schedule_rates(schedule: str, total: int, steps: range) -> list[float]:
    """transformers' own schedule: the rate each of ``steps`` (1-based) trains at."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    scheduler = get_scheduler(SCHEDULES[schedule], optimizer, num_warmup_steps=2, num_training_steps=total)
    rates = []
    for _ in range(max(steps)):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [rates[s - 1] for s in steps]


def assert_same_weights(a, b) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_extending_a_finished_run_trains_on_the_new_schedule(cfg_factory, tmp_path, schedule: str) -> None:
    # Seen failing without follow_schedule: cosine's step 5 trained at 0.0 (the 4-step schedule's end), not 0.0075.
    overrides = (*EXTEND, f"optimizer.schedule={schedule}")
    run(cfg_factory(*overrides, "trainer.max_steps=4"))
    info = run(cfg_factory(*overrides, "trainer.max_steps=8", "trainer.resume=true"))
    rates = logged(tmp_path / "run", "train/lr")
    assert rates == schedule_rates(schedule, 4, range(1, 5)) + schedule_rates(schedule, 8, range(5, 9))
    assert info["steps"] == 8 and len(logged(tmp_path / "run", "train/loss")) == 8
    if schedule == "cosine":
        assert rates[4] == pytest.approx(0.0075, abs=1e-12)
    else:  # a schedule that does not depend on the length: the same weights as 8 steps straight through
        run(cfg_factory(*overrides, "trainer.max_steps=8", run_dir=tmp_path / "straight"))
        assert_same_weights(tmp_path / "run", tmp_path / "straight")
        assert logged(tmp_path / "run", "train/loss") == logged(tmp_path / "straight", "train/loss")


def test_a_run_shorter_than_its_checkpoint_is_refused(cfg_factory, trained_run) -> None:
    with pytest.raises(PetunerError, match=r"^trainer.resume=true: the checkpoint is at step 6, beyond this run's 5 "
                                           r"steps; set trainer.max_steps \(or trainer.epochs\) to at least that$"):
        run(cfg_factory("trainer.max_steps=5", "trainer.resume=true", run_dir=trained_run))


@pytest.mark.parametrize(("override", "key", "old", "more"), [
    ("trainer.batch_size=2", "trainer.batch_size", 4, ""),
    ("trainer.grad_accum=2", "trainer.grad_accum", 1, ""),
    ("trainer.seed=7", "trainer.seed", 42, ""),
    ("trainer.max_grad_norm=0.5", "trainer.max_grad_norm", 1.0, ""),
    ("objective=eval/perplexity", "objective", "eval/loss", ""),
    ("optimizer.lr=1e-3", "optimizer.lr", 0.01, " (and 2 more: trainer.grad_accum, trainer.seed)"),
])
def test_a_change_that_breaks_continuation_is_refused(cfg_factory, trained_run, override, key, old, more) -> None:
    # Seen failing before: trainer.* and objective were never compared; the run trained on.
    overrides = [override, "trainer.grad_accum=3", "trainer.seed=1"] if more else [override]
    before = sorted((p, p.stat().st_mtime_ns) for p in trained_run.rglob("*"))
    with pytest.raises(PetunerError) as err:
        run(cfg_factory(*overrides, "trainer.resume=true", run_dir=trained_run))
    new = override.split("=", 1)[1]
    new = new if key == "objective" else json.loads(new)
    message = str(err.value)
    assert message.startswith(f"trainer.resume=true but {key}={new!r} differs from the {old!r} that "
                              f"{trained_run}/config.yaml trained with{more}; a resume continues the same steps, "
                              "so only these trainer keys may change: max_steps, epochs, ")
    assert message.endswith(f"; to train with {key}={new!r}, start a new run_dir") and "\n" not in message
    assert sorted((p, p.stat().st_mtime_ns) for p in trained_run.rglob("*")) == before


def test_bookkeeping_may_change_on_resume_and_the_weights_stay_exact(cfg_factory, tmp_path, monkeypatch) -> None:
    # Also: eval/loss_before survives the resume (seen failing before: the resumed run.json had no *_before).
    straight = run(cfg_factory("trainer.max_steps=4", "trainer.save_every=2", run_dir=tmp_path / "straight"))
    with monkeypatch.context() as patch:
        crash_after_first_checkpoint(patch)
        with pytest.raises(Crash):
            run(cfg_factory("trainer.max_steps=4", "trainer.save_every=2"))
    resumed = run(cfg_factory("trainer.max_steps=4", "trainer.resume=true", "trainer.save_every=1",
                              "trainer.keep_checkpoints=4", "trainer.eval_every=1", "trainer.eval_batch_size=5",
                              "trainer.log_every=2"))
    assert_same_weights(tmp_path / "run", tmp_path / "straight")
    assert [c.name for c in checkpoints(tmp_path / "run")] == [f"step-0000000{i}" for i in (2, 3, 4)]  # applied
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "eval/loss" in m] == [0, 3, 4]
    assert {k: v for k, v in resumed["results"].items() if "_before" in k} == \
        {k: v for k, v in straight["results"].items() if "_before" in k} != {}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["results"]["eval/loss_before"] == \
        straight["results"]["eval/loss_before"]
