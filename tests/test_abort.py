"""SIGTERM (the web page's Abort) stops a run at a step boundary with a checkpoint that resumes exactly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from petuner.errors import PetunerError
from petuner.run import run
from petuner.train.abort import StopOnSignal
from petuner.train.checkpoint import checkpoints
from petuner.train.logging import read_metrics
from tests.conftest import make_cfg


def test_sigterm_checkpoints_the_last_step_and_resume_matches_straight(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Planted bugs this failed on: no handler (the test process dies of SIGTERM); checkpointing step+1
    # (resume skips a step: weights differ); raising after the other hooks' before_step (losses differ).
    straight, aborted = tmp_path / "straight", tmp_path / "aborted"
    overrides = ("trainer.save_every=null", "adapter.dropout=0.1")  # dropout: the RNG state must resume too
    run(make_cfg(straight, *overrides))
    original = StopOnSignal.before_step

    def kill_during_step_4(self: StopOnSignal, state) -> None:  # the signal lands mid-step; step 4 finishes
        original(self, state)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(StopOnSignal, "before_step", kill_during_step_4)
        with pytest.raises(PetunerError, match=r"stopped by SIGTERM after step 4: checkpoint .*step-00000004 kept"):
            run(make_cfg(aborted, *overrides))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only while training
    assert [c.name for c in checkpoints(aborted)] == ["step-00000004"]
    assert not (aborted / "adapter.safetensors").exists()  # not a finished run
    run(make_cfg(aborted, *overrides, "trainer.resume=true"))
    a, b = load_file(straight / "adapter.safetensors"), load_file(aborted / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[m["train/loss"] for m in read_metrics(d) if "train/loss" in m] for d in (straight, aborted)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
