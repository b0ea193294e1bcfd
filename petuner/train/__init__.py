"""The training machinery: loop, hooks, checkpoints, device/precision and metrics logging."""
