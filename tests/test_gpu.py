"""CUDA: precision=auto picks bf16 autocast where supported, and memory comes from the CUDA allocator."""

from __future__ import annotations

import pytest
import torch

from petuner.run import run

pytestmark = pytest.mark.gpu


def test_auto_device_and_precision_on_cuda(cfg_factory) -> None:
    info = run(cfg_factory("trainer.max_steps=3"))
    assert info["device"].startswith("cuda")
    assert info["compute_dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert info["results"]["memory/peak_bytes"] > 0
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
