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


@pytest.mark.parametrize("overrides", [("adapter=adalora",), ("adapter=sora",), ("adapter=none", "optimizer=galore")])
def test_resume_on_cuda_reproduces_an_uninterrupted_run(resume_check, overrides) -> None:
    """Hook states (AdaLoRA's importance scores) load onto the GPU their parameters live on."""
    resume_check(*overrides, "trainer.device=cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_weights_train_on_cuda(cfg_factory, precision) -> None:
    """bf16/fp16 weights with fp32 adapters, under the matching autocast (fp16: the gradient scaler)."""
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    info = run(cfg_factory(f"model.dtype={dtype}", f"trainer.precision={precision}", "trainer.max_steps=3"))
    assert list(info["parameter_dtypes"]["trainable"]) == ["float32"]
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
