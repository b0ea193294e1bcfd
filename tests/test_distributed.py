"""torchrun on CPU (gloo): two processes train what one process trains, write one set of outputs, and a
killed two-process run resumes to the very bits of an uninterrupted one.

Each torchrun launch costs two interpreter starts; the cases share launches (``tests/torchrun_cases.py``
trains several runs in one launch) to keep CI short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from petuner.errors import PetunerError
from petuner.run import run
from petuner.train.checkpoint import checkpoints
from petuner.train.logging import read_metrics
from tests.conftest import make_cfg
from tests.helpers import DPO, PAIRS, dpo_runs_match

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# Adam moves a weight by ~lr · m/√v: a gradient that differs by float rounding (1e-7 relative) moves it by
# up to ~lr · 1e-7 per step more or less, hence a modest lr for a 1e-6 comparison.
COMMON = ("trainer.max_steps=4", "trainer.save_every=2", "trainer.batch_size=4", "optimizer.lr=1e-3")
CASES = {  # the same global batches in one and in two processes
    "lora": ("adapter.dropout=0",),
    "lora_accum2": ("adapter.dropout=0", "trainer.grad_accum=2"),
    "dylora": ("adapter=dylora", "adapter.dropout=0"),
    "sora": ("adapter=sora", "adapter.gate_init=randn", "adapter.xi=2.0", "adapter.dropout=0"),
    # DCT projector: an SVD's (or randomized SVD's) top-r subspace turns with rounding-level gradient
    # differences when singular values nearly tie (one process, batch 4 against 2 × 2 accumulated, already
    # differs by 4e-5 at rank 16); the DCT basis does not, so the comparison tests the averaging, not the SVD.
    # DPO: a concatenated forward of chosen and rejected, the reference by the adapter switch on the unwrapped model
    "dpo": ("adapter.dropout=0", *DPO),
    # KTO: the KL estimate summed over ranks (without it the step-3 loss is 2e-4 off); a high lr makes it live
    # (> 0) by step 3. Held out the estimate is each batch's own (TRL's too): eval batches equal in both.
    "kto": ("adapter.dropout=0", "loss=kto", *PAIRS, "trainer.eval_batch_size=4", "optimizer.lr=3e-2"),
    "galore": ("adapter=none", "optimizer=galore", "optimizer.rank=8", "optimizer.update_proj_gap=3",
               "optimizer.lr=1e-3", "optimizer.projector=dct"),
}
# Adam turns rounding-level gradient differences into weight differences of up to ~lr · 1e-3 (3.4e-5 measured
# at KTO's lr 3e-2, also with the KL term left per rank: the losses are what tell those apart)
ADAPTER_ATOL = {"kto": 1e-4}
# FSDP, against one process with the same constant schedule; "fsdp_resumed" stops after its step-2 checkpoint
# and resumes to step 4 (a constant schedule does not depend on max_steps).
FSDP = ("adapter.dropout=0", "trainer.strategy=fsdp", "optimizer.schedule=constant")
# DPO under FSDP: the reference by switching the sharded model's adapter off, scored once before sharding, or
# the starting adapter swapped into the shards (continued from the "fsdp" case's SFT run, trained first).
FSDP_DPO = {"fsdp_dpo": DPO, "fsdp_dpo_precomputed": (*DPO, "loss.precompute_reference=true"),
            "fsdp_dpo_continued": (*DPO, "init_from={root}/fsdp")}
# A trainable tensor in FSDP's root unit (LoRA on lm_head, outside the decoder layers, whose gathered weights the root
# keeps after a forward): SFT, then DPO continued from it. SGD: Adam turns the output layer's rounding-level gradient
# differences into weight differences of 1e-4 (measured), SGD does not.
ROOT_TARGETS = ("adapter.target_modules=[q_proj,v_proj,lm_head]", "optimizer=sgd")
FSDP_ROOT = {"fsdp_root_sft": ROOT_TARGETS, "fsdp_root_dpo": (*ROOT_TARGETS, *DPO, "init_from={root}/fsdp_root_sft")}

# Every run of the one torchrun launch, in order (a run continued from another comes after it)
LAUNCHED = (*CASES, "straight", "fsdp", "fsdp_resumed", *FSDP_DPO, *FSDP_ROOT)


def fsdp_case(case: str, root: Path) -> tuple[str, ...]:
    """A case's overrides (FSDP_DPO's or FSDP_ROOT's), its runs to continue from under ``root``."""
    return tuple(o.format(root=root) for o in {**FSDP_DPO, **FSDP_ROOT}[case])
# Dropout on: each rank's RNG stream must come back on resume.
KILLED = ("trainer.max_steps=8", "trainer.save_every=2", "trainer.batch_size=4", "adapter.dropout=0.1")


def torchrun(root: Path, *cases: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "tests" / "torchrun_cases.py"), str(root), *cases]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def steps_logged(run_dir: Path) -> int:
    try:
        return sum("train/loss" in m for m in read_metrics(run_dir))
    except (FileNotFoundError, ValueError):
        return 0


def adapters_equal(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and x
    for key in x:
        if atol == 0:
            assert torch.equal(x[key], y[key]), key
        else:
            torch.testing.assert_close(y[key], x[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case, plus the uninterrupted run of the kill test, in one torchrun launch."""
    root = tmp_path_factory.mktemp("torchrun")
    done = subprocess.run(torchrun(root, *LAUNCHED), env=env(), cwd=root, capture_output=True, text=True)
    (root / "stderr.txt").write_text(done.stderr)  # each test checks its own runs finished (finished())
    return root


def finished(root: Path, *cases: str) -> None:
    for case in cases:
        assert (root / case / "adapter.safetensors").is_file(), (root / "stderr.txt").read_text()[-4000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_match_one(two_processes: Path, tmp_path: Path, case: str) -> None:
    one = tmp_path / case
    info = run(make_cfg(one, *COMMON, *CASES[case]))
    finished(two_processes, case)
    two = two_processes / case
    adapters_equal(one, two, atol=ADAPTER_ATOL.get(case, 1e-6))
    metrics = [read_metrics(d) for d in (one, two)]
    losses = [[m["train/loss"] for m in ms if "train/loss" in m] for ms in metrics]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and len(losses[0]) == 4
    evals = [[m["eval/loss"] for m in ms if "eval/loss" in m] for ms in metrics]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5) and len(evals[0]) == 2
    if case == "dpo":
        dpo_runs_match(one, two, loss_rel=1e-5, rewards_abs=1e-6)
    assert info["processes"] == 1


def test_fsdp_matches_one_process_and_resumes(two_processes: Path, tmp_path: Path) -> None:
    finished(two_processes, "fsdp", "fsdp_resumed")
    run(make_cfg(tmp_path / "one", *COMMON, "adapter.dropout=0", "optimizer.schedule=constant"))
    adapters_equal(tmp_path / "one", two_processes / "fsdp", atol=1e-6)
    adapters_equal(two_processes / "fsdp", two_processes / "fsdp_resumed", atol=0)
    losses = [[m["train/loss"] for m in read_metrics(d) if "train/loss" in m]
              for d in (tmp_path / "one", two_processes / "fsdp", two_processes / "fsdp_resumed")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == losses[1]


@pytest.mark.parametrize("case", sorted(FSDP_DPO))
def test_fsdp_dpo_matches_one_process(two_processes: Path, tmp_path: Path, case: str) -> None:
    """Losses, rewards and the final adapter of one process, within float-sum reordering: logps of ~65 in fp32
    round at ~4e-6, so rewards (0.1 x a logp difference) at ~1e-6."""
    finished(two_processes, case)
    run(make_cfg(tmp_path / "one", *COMMON, "adapter.dropout=0", "optimizer.schedule=constant",
                 *fsdp_case(case, two_processes)))
    adapters_equal(tmp_path / "one", two_processes / case, atol=1e-6)
    dpo_runs_match(tmp_path / "one", two_processes / case, loss_rel=1e-5, rewards_abs=1e-6)


def test_fsdp_dpo_continued_with_a_trainable_root_tensor(two_processes: Path, tmp_path: Path) -> None:
    """The starting adapter swapped into the root unit's shards too, re-gathered for the reference's forward and
    again for the policy's (seen failing without the re-gathering: a gathered tensor's shape against a shard's)."""
    finished(two_processes, *FSDP_ROOT)
    run(make_cfg(tmp_path / "one", *COMMON, "adapter.dropout=0", "optimizer.schedule=constant",
                 *fsdp_case("fsdp_root_dpo", two_processes)))
    adapters_equal(tmp_path / "one", two_processes / "fsdp_root_dpo", atol=1e-6)
    dpo_runs_match(tmp_path / "one", two_processes / "fsdp_root_dpo", loss_rel=1e-5, rewards_abs=1e-6)


def test_one_set_of_outputs(two_processes: Path) -> None:
    """One run folder per run, one metrics line per step, one wandb run (the lora case logs to wandb)."""
    finished(two_processes, *LAUNCHED)
    assert {p.name for p in two_processes.iterdir() if p.is_dir()} == set(LAUNCHED)
    run_dir = two_processes / "lora"
    steps = [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert steps == [1, 2, 3, 4]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert [c.name for c in checkpoints(run_dir)] == ["step-00000002", "step-00000004"]


def test_killed_two_process_run_resumes_bit_identical(two_processes: Path, tmp_path: Path) -> None:
    finished(two_processes, "straight")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(tmp_path, "killed"), env=env(), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and steps_logged(killed) < 3:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers at once, mid-training
    proc.wait()
    assert checkpoints(killed) and steps_logged(killed) < 8
    done = subprocess.run(torchrun(tmp_path, "killed", "resume"), env=env(), cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    straight = two_processes / "straight"
    adapters_equal(straight, killed, atol=0)
    losses = [[m["train/loss"] for m in read_metrics(d) if "train/loss" in m] for d in (straight, killed)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_resume_with_another_process_count_is_one_line(two_processes: Path) -> None:
    finished(two_processes, "lora")
    run_dir = two_processes / "lora"
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(PetunerError, match=r"written by 2 process\(es\) but this run has 1; resume with the same"):
        run(make_cfg(run_dir, *COMMON, *CASES["lora"], "trainer.resume=true"))
    assert sorted(p.name for p in run_dir.rglob("*")) == before
