"""Train one run, or a sweep with -m: `python train.py adapter=lora trainer.max_steps=100`."""

import sys

import hydra
from omegaconf import DictConfig

from petuner.config import check_group_choices
from petuner.errors import PetunerError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from petuner.run import run

    try:
        run(cfg)
    except PetunerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_group_choices([a for a in sys.argv[1:] if not a.startswith("-")])
    except PetunerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
