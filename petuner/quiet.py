"""Keep runs quiet: a library warning that concerns a feature the run does not use is held back.

bitsandbytes warns at import (and peft imports it) that its CPU 4-bit kernel could not be loaded.
Only a 4-bit layer (QLoRA) could care, so the message is held here and given out by
``release_4bit_kernel_warning`` when the first such layer is built.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_held: list[logging.LogRecord] = []


class _Hold(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "gemm_4bit_forward" in str(record.msg):
            _held.append(record)
            return False
        return True


def hold_4bit_kernel_warning() -> None:
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _Hold) for f in logger.filters):
        logger.addFilter(_Hold())


def release_4bit_kernel_warning() -> None:
    """Log the held bitsandbytes 4-bit kernel warning (once): a 4-bit layer is now in use."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    for f in [f for f in logger.filters if isinstance(f, _Hold)]:
        logger.removeFilter(f)
    while _held:
        logger.warning(_held.pop(0).getMessage())
