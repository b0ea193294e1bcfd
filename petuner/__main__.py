"""``python -m petuner ...`` is ``petuner ...`` (and ``torchrun ... -m petuner train ...`` launches training)."""

import sys

from petuner.cli import main

sys.exit(main())
