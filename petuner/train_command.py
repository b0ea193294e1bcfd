"""``petuner train`` (and ``python train.py``, its thin wrapper): one Hydra application over the shipped groups.

The config groups are read from the package (``pkg://petuner.conf``) from any working directory; ``--config-dir
DIR`` puts the user's own groups before them, and every other Hydra flag (``--cfg job``, ``-m``, ``--help``,
``--config-name``, ...) passes through. Under torchrun each process runs this same entry point. Bad input is one
line on stderr and exit status 2, before Hydra composes anything heavy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from petuner.config import check_command_line, hydra_entry, read_command_line, register_schemas
from petuner.errors import PetunerError


def _train(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from petuner.sweep import run_job

    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        return run_job(cfg, sweep_dir)  # the objective, for search sweepers (optuna)
    except PetunerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None, prog: str = "petuner train") -> None:
    """Check the command line, then hand it to Hydra (which reads ``sys.argv``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: join the group before Hydra names the run folder
        from petuner.train.distributed import init_from_env

        init_from_env()
    register_schemas()
    try:
        line = read_command_line(argv)
        check_command_line(line.overrides, line.config_dir, line.config_name)
    except PetunerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    entry = hydra_entry(line.config_dir, line.config_name)  # the user's folder first, then the shipped groups
    sys.argv = [prog, *with_overrides(without_config_dir(argv), line.overrides, entry.overrides)]
    hydra.main(config_path=entry.config_path, config_name=entry.config_name, version_base="1.3")(_train)()


def with_overrides(argv: list[str], present: Sequence[str], added: Sequence[str]) -> list[str]:
    """``added`` overrides placed beside the command line's own: argparse reads one run of positional words, so
    ``hydra.searchpath=... -m a=1`` would leave ``a=1`` unrecognised."""
    at = argv.index(present[0]) if present else 0
    return [*argv[:at], *added, *argv[at:]]


def without_config_dir(argv: Sequence[str]) -> list[str]:
    """The command line less ``--config-dir DIR``: petuner places that folder itself (see primary_search_path)."""
    out: list[str] = []
    for arg in argv:
        if out[-1:] in (["--config-dir"], ["-cd"]):
            out.pop()
        elif not arg.startswith("--config-dir="):
            out.append(arg)
    return out
