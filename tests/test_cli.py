"""End to end through the real entry points, as a user types them (subprocesses: a few only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from petuner.config import group_choices
from petuner.schema import keys
from petuner.train.schema import TrainerSchema
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
PETUNER = [sys.executable, "-m", "petuner.cli"]
pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_train_with_overrides_then_export(tmp_path) -> None:
    # No run_dir override: the run lands in ./adapters/<model>_<adapter>_<time> under the working folder.
    done = sh([sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_steps=2", "adapter.r=4",
               "export=peft"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "adapters").iterdir()
    assert run_dir.name.startswith("tiny_llama_lora_")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == 2 and (run_dir / "export-peft" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "export-peft" / "adapter_config.json").read_text())["r"] == 4

    out = tmp_path / "merged"
    done = sh([*PETUNER, "export", str(run_dir), "--format", "merged", "--out", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    again = sh([*PETUNER, "export", str(run_dir), "--format", "merged", "--out", str(out)], cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: --out {out} is not empty; pass --force to replace it"]


@pytest.mark.parametrize("args, message", [
    (["adapter=lorra"], "error: adapter='lorra' is not a choice of the 'adapter' config group; allowed: "
                        + ", ".join(group_choices("adapter"))),
    # the trainer schema has no such key, so a leading + (a new key) would not help: the line lists its keys
    (["trainer.max_stpes=5"], "error: trainer.max_stpes is not a config key; did you mean trainer.max_steps? "
                              "allowed: " + ", ".join(keys(TrainerSchema))),
    ([*TINY, "trainer.batch_size=0"], "error: trainer.batch_size=0: must be an integer >= 1"),
    (["logger=[tensorboard,mlfow]"], "error: logger='mlfow' is not a choice of the 'logger' config group; allowed: "
                                     + ", ".join(group_choices("logger"))),
    ([*TINY, "trainer.eval_every=2", "trainer.early_stopping_patience=-1"],
     "error: trainer.early_stopping_patience=-1: must be an integer >= 1 or null"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message) -> None:
    done = sh([sys.executable, str(ROOT / "train.py"), *args, f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == message


def test_bash_completion_completes_verbs_and_hydra_groups(tmp_path) -> None:
    script = sh([*PETUNER, "completion", "bash"], cwd=tmp_path).stdout
    probe = '_petuner; echo "${COMPREPLY[@]}"'
    lines = [f'COMP_LINE="petuner train adapter=d"; COMP_WORDS=(petuner train adapter=d); COMP_CWORD=2; {probe}',
             f'COMP_LINE="petuner e"; COMP_WORDS=(petuner e); COMP_CWORD=1; {probe}']
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `petuner` as the venv installs it
    done = subprocess.run(["bash", "-c", "\n".join([script, *lines])], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": path})
    offered = [sorted(line.split()) for line in done.stdout.splitlines()]
    assert offered == [["adapter=dylora"], ["eval", "eval-ranks", "export"]], done.stderr
