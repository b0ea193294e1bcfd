"""trainer.compile, model.attn_implementation and pure-bf16 weights: the same training, other kernels."""

from __future__ import annotations

import pytest
import torch

from petuner.run import run
from petuner.train.compile import compile_model, decoder_layers
from petuner.train.logging import read_metrics


def losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.mark.slow
def test_compiled_training_matches_eager(cfg_factory, tmp_path) -> None:
    run(cfg_factory("trainer.max_steps=3", "adapter.dropout=0", run_dir=tmp_path / "eager"))
    run(cfg_factory("trainer.max_steps=3", "adapter.dropout=0", "trainer.compile=true", run_dir=tmp_path / "compiled"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 3
    assert compiled == pytest.approx(eager, abs=1e-5, rel=0)


def test_compile_falls_back_to_each_decoder_layer(cfg_factory, monkeypatch) -> None:
    """A whole-model compile that dynamo rejects at the first forward: the layers are compiled instead,
    that forward reruns, and the result is the eager one."""
    from petuner.models import load_model

    model = load_model(cfg_factory().model).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    with torch.no_grad():
        expected = model(**batch).loss
    compiled: list[object] = []

    def fake_compile(fn, *args, **kwargs):
        compiled.append(getattr(fn, "__self__", None))
        if fn.__self__ is model:
            def fail(*a, **k):
                raise torch._dynamo.exc.Unsupported("nope")
            return fail
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_model(model)
    with torch.no_grad():
        loss = model(**batch).loss
    layers = decoder_layers(model)
    assert compiled == [model, *layers]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert model._compiled_call_impl is None
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementation_reaches_the_model(cfg_factory, attn: str) -> None:
    from petuner.models import load_model

    model = load_model(cfg_factory(f"model.attn_implementation={attn}").model)
    assert model.config._attn_implementation == attn


def test_pure_bf16_weights_train(cfg_factory) -> None:
    """bf16 storage and compute on the tiny model (slow on CPUs: meant for GPUs), loss going down."""
    info = run(cfg_factory("model.dtype=bfloat16", "trainer.max_steps=4"))
    results = info["results"]
    assert results["eval/loss_after"] < results["eval/loss_before"]
    frozen = info["total_parameters"] - info["trainable_parameters"]
    assert results["memory/param_bytes"] <= 2 * frozen + 4 * info["trainable_parameters"]  # 2 bytes a base weight
