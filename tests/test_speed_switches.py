"""trainer.compile, model.attn_implementation and pure-bf16 weights: the same training, other kernels."""

from __future__ import annotations

import copy

import pytest
import torch

from petuner.run import run
from petuner.train.blocks import decoder_layers
from petuner.train.compile import compile_model
from petuner.train.logging import read_metrics
from tests.helpers import DPO, dpo_runs_match


def losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_matches_eager(cfg_factory, tmp_path, checkpointing: bool) -> None:
    """Compiled layers, also under gradient checkpointing (traced into each layer's graph)."""
    common = ("trainer.max_steps=3", "adapter.dropout=0", f"trainer.gradient_checkpointing={checkpointing}")
    run(cfg_factory(*common, run_dir=tmp_path / "eager"))
    run(cfg_factory(*common, "trainer.compile=true", run_dir=tmp_path / "compiled"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 3
    assert compiled == pytest.approx(eager, abs=1e-5, rel=0)


@pytest.mark.slow
def test_compiled_dpo_matches_eager(cfg_factory, tmp_path) -> None:
    """DPO through compiled layers, its reference the same compiled layers with the adapter switched off (a
    recompile on the switch's flag, and on no_grad): eager's losses and rewards, evaluations included."""
    common = ("trainer.max_steps=3", "adapter.dropout=0", *DPO)
    run(cfg_factory(*common, run_dir=tmp_path / "eager"))
    run(cfg_factory(*common, "trainer.compile=true", run_dir=tmp_path / "compiled"))
    dpo_runs_match(tmp_path / "eager", tmp_path / "compiled", loss_rel=1e-5, rewards_abs=1e-5,
                   accuracies=False)


def test_compile_compiles_each_decoder_layer_into_one_graph(cfg_factory) -> None:
    """Every decoder layer compiled in place, not the model (its output path stays eager); the layers share
    dynamo's graphs (two: the first layer's input needs no gradient); loss and gradients are eager's."""
    from torch._dynamo.utils import counters

    from petuner.adapters import adapter_layers, build_adapter, inject
    from petuner.models import load_model

    cfg = cfg_factory("adapter.dropout=0", "model.random_init.num_hidden_layers=4")
    torch.manual_seed(0)
    model = load_model(cfg.model)
    model.config.use_cache = False
    inject(model, build_adapter(cfg.adapter), [])
    for _, layer in adapter_layers(model):  # B = 0 would leave A without a gradient
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compile_model(model)
    batch = {"input_ids": torch.randint(0, 100, (2, 12)), "labels": torch.randint(0, 100, (2, 12))}
    losses = [m(**batch).loss for m in (model, eager)]
    for loss in losses:
        loss.backward()
    layers = decoder_layers(model)
    assert len(layers) == 4 and all(layer._compiled_call_impl is not None for layer in layers)
    assert model._compiled_call_impl is None
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().max() > 0 for g in grads.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_decoder_layers_are_the_no_split_modules_else_the_longest_module_list(cfg_factory) -> None:
    """What compilation and FSDP take as the model's blocks; a model with neither is compiled whole."""
    from torch import nn

    from petuner.models import load_model

    llama = load_model(cfg_factory().model, meta=True)
    assert [type(m).__name__ for m in decoder_layers(llama)] == ["LlamaDecoderLayer"] * 2
    plain = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.Linear(2, 2), nn.ReLU()]))
    assert decoder_layers(plain) == list(plain[1])
    whole = nn.Sequential(nn.Linear(2, 2))
    assert decoder_layers(whole) == []
    compile_model(whole)  # lazily: nothing is traced until a forward
    assert whole._compiled_call_impl is not None


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
