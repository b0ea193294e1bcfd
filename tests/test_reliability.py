"""Reliability: the non-finite guard, corrupt or foreign weights, stale logs, atomic writes under failure."""

from __future__ import annotations

import math

import pytest
import torch

import petuner
from petuner.errors import PetunerError
from petuner.io import atomic_dir
from petuner.run import run
from petuner.train.abort import StopOnSignal
from petuner.train.checkpoint import checkpoints, hook_names, hook_states, load_hook_states
from petuner.train.guard import NonFiniteGuard
from petuner.train.hooks import Hook, TrainState
from petuner.train.logging import read_metrics
from petuner.train.loop import Loop


def poison_step(monkeypatch, bad_steps: set[int]) -> None:
    """Make the training loss NaN on the given (1-based) steps (grad_accum=1: one forward per step)."""
    original = Loop.train

    def train(self, start_step=0):
        forwards = {"n": start_step}

        def nan_loss(module, args, output):
            if module.training:
                forwards["n"] += 1
                if forwards["n"] in bad_steps:
                    output.loss = output.loss * float("nan")
            return output

        handle = self.model.register_forward_hook(nan_loss)
        try:
            return original(self, start_step)
        finally:
            handle.remove()

    monkeypatch.setattr(Loop, "train", train)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(cfg_factory, tmp_path, monkeypatch) -> None:
    poison_step(monkeypatch, {5})
    with pytest.raises(PetunerError, match=r"non-finite loss at step 5 .* last good checkpoint: .*step-00000003"):
        run(cfg_factory("trainer.max_steps=6", "trainer.save_every=3"))
    (checkpoint,) = checkpoints(tmp_path / "run")
    assert checkpoint.name == "step-00000003"
    monkeypatch.undo()
    run(cfg_factory("trainer.max_steps=6", "trainer.save_every=3", "trainer.resume=true"))  # loadable


def test_nonfinite_step_can_be_skipped_and_counted(cfg_factory, tmp_path, monkeypatch) -> None:
    poison_step(monkeypatch, {2, 4})
    info = run(cfg_factory("trainer.max_steps=6", "trainer.on_nonfinite=skip"))
    steps = {m["step"]: m for m in read_metrics(tmp_path / "run") if "train/loss" in m}
    assert [steps[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 1, 1, 2, 2, 2]
    model, _ = petuner.load(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(info["results"]["eval/loss_after"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_gradient_under_a_finite_loss_is_caught(bad: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e6  # large but finite: no false alarm
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), max_steps=1,
                       loss=torch.tensor(1.0))
    guard = NonFiniteGuard("skip")
    guard.after_backward(state)
    assert not state.skip_update
    model[1].weight.grad[1, 2] = bad
    guard.after_backward(state)
    assert state.skip_update and guard.skipped == 1
    assert all(p.grad is None for p in model.parameters())
    model[0].bias.grad = torch.full((3,), bad)
    with pytest.raises(PetunerError, match="non-finite gradient at step 1"):
        NonFiniteGuard("stop").after_backward(state)


def test_corrupt_adapter_file_is_one_line(trained_run, tmp_path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    data = (copy / "adapter.safetensors").read_bytes()
    (copy / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PetunerError, match="does not match its checksum") as err:  # caught by the manifest
        petuner.load(copy)
    (copy / "petuner_manifest.json").unlink()
    with pytest.raises(PetunerError, match="not a readable safetensors file") as err:  # and without it
        petuner.load(copy)
    assert "\n" not in str(err.value)


def test_adapter_from_another_base_model_is_refused(trained_run, cfg_factory, tmp_path) -> None:
    run(cfg_factory("model.random_init.hidden_size=32", "model.random_init.intermediate_size=64",
                    "trainer.max_steps=1", run_dir=tmp_path / "other"))
    with pytest.raises(PetunerError, match="another base model"):
        petuner.load(trained_run, weights=tmp_path / "other" / "adapter.safetensors")


def test_fresh_start_after_a_dead_attempt_forgets_its_log(cfg_factory, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 99, "train/loss": 1.0}\n')
    run(cfg_factory("trainer.max_steps=2", "trainer.save_every=null"))
    assert max(m["step"] for m in read_metrics(run_dir)) == 2


def test_atomic_dir_leaves_the_old_folder_on_failure(tmp_path) -> None:
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest, replace=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind


class Counter(Hook):
    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


class Other(Counter):
    pass


def test_hook_states_load_by_name_and_from_checkpoints_written_before_a_hook_existed(tmp_path) -> None:
    """A stateless hook added since (StopOnSignal) does not stop a checkpoint from resuming, whether it names its
    hooks' states or lists them by position (as checkpoints did before: seen failing then, zip(strict=True)); a
    state missing for a hook that keeps one, or kept for a hook the run lacks, is one line."""
    states = hook_states([Counter(3), Other(5)])
    for saved in (states, list(states.values())):
        now = [StopOnSignal(), Counter(), Other()]
        load_hook_states(now, saved, tmp_path)
        assert (now[1].n, now[2].n) == (3, 5)
    with pytest.raises(PetunerError, match=r"holds no state for Other \(written by another petuner version"):
        load_hook_states([Counter(), Other()], {"Counter": {"n": 1}}, tmp_path)
    with pytest.raises(PetunerError, match=r"holds the state of Other, which this run does not have"):
        load_hook_states([Counter()], states, tmp_path)
    with pytest.raises(PetunerError, match=r"holds the states of 3 per-step hooks, this run has 2 \(Counter, Other\)"):
        load_hook_states([Counter(), Other()], [{}, {"n": 1}, {"n": 2}], tmp_path)
    assert hook_names([Counter(), Counter(), Other()]) == ["Counter#0", "Counter#1", "Other"]
