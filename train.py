"""Train one run, or a sweep with -m: `python train.py adapter=lora trainer.max_steps=100`."""

import os
import sys

import hydra
from omegaconf import DictConfig

from petuner.config import check_command_line, command_line_overrides, register_schemas
from petuner.errors import PetunerError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
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


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: join the group before Hydra names the run folder
        from petuner.train.distributed import init_from_env

        init_from_env()
    register_schemas()
    try:
        # Hydra's own flags (--cfg job, --resolve, --info, --help, -m, ...) pass through to Hydra.
        check_command_line(command_line_overrides(sys.argv[1:]))
    except PetunerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
