"""Train one run, or a sweep with -m: `python train.py adapter=lora trainer.max_steps=100`.

The same as `petuner train ...` (petuner/train_command.py): the same configs, flags, errors and exit codes.
"""

from petuner.train_command import main

if __name__ == "__main__":
    main(prog="train.py")
