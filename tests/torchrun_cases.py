"""Runs under ``torchrun``: trains the named cases of ``tests/test_distributed.py``, one after the other,
in one process group. ``python -m torch.distributed.run --nproc_per_node=2 tests/torchrun_cases.py ROOT
CASE... [resume]``; each case's run folder is ROOT/CASE."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from petuner.run import run
from tests.conftest import make_cfg
from tests.test_distributed import CASES, COMMON, FSDP, FSDP_DPO, FSDP_ROOT, KILLED, fsdp_case


def overrides(case: str, root: Path) -> tuple[str, ...]:
    if case in ("straight", "killed"):
        return KILLED
    if case == "fsdp":
        return (*COMMON, *FSDP)
    if case in FSDP_DPO or case in FSDP_ROOT:
        return (*COMMON, *FSDP, *fsdp_case(case, root))
    if case == "lora":  # also shows that two processes make one wandb run
        os.environ["WANDB_MODE"] = "offline"
        return (*COMMON, *CASES[case], "logger=wandb", "logger.wandb.mode=offline")
    os.environ["WANDB_MODE"] = "disabled"
    return (*COMMON, *CASES[case])


if __name__ == "__main__":
    root, names = Path(sys.argv[1]), sys.argv[2:]
    resume = ("trainer.resume=true",) if names[-1] == "resume" else ()
    for name in [n for n in names if n != "resume"]:
        if name == "fsdp_resumed":  # to its first checkpoint, then on from it
            run(make_cfg(root / name, *COMMON, *FSDP, "trainer.max_steps=2"))
            run(make_cfg(root / name, *COMMON, *FSDP, "trainer.resume=true"))
            continue
        run(make_cfg(root / name, *overrides(name, root), *resume))
