"""The real pretrained SmolLM2-135M-Instruct (packaged GGUF, converted once): LoRA lowers held-out loss."""

from __future__ import annotations

import pytest

from petuner.run import run

pytestmark = pytest.mark.slow


def test_lora_on_smollm2_lowers_heldout_loss(cfg_factory) -> None:
    cfg = cfg_factory("model=smollm2_135m", "data.limit=null", "data.eval_size=48", "data.max_length=96",
                      "trainer.max_steps=12", "trainer.batch_size=8", "optimizer.lr=1e-3",
                      "optimizer.warmup_steps=2", "adapter.dropout=0.0", "trainer.save_every=null")
    info = run(cfg)
    results = info["results"]
    assert info["trainable_parameters"] == 30 * 8 * (576 + 576) + 30 * 8 * (576 + 192)  # q: 576→576, v: 576→192
    assert results["eval/loss_after"] < results["eval/loss_before"] - 0.1, results
