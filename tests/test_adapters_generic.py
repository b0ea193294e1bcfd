"""Every registered adapter through the same tests. A new method adds one row to ADAPTERS."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from petuner.adapters import (
    adapter_layers,
    adapter_names,
    adapter_state_dict,
    build_adapter,
    disabled_adapters,
    inject,
    load_adapter_state_dict,
    merge_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from tests.test_lora import tiny_llama

# name → (adapter config, modules it must wrap in the tiny Llama)
QV = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
ADAPTERS = {
    "lora": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "scaling": "standard", "bias": "none"}, QV),
    "none": ({"name": "none"}, []),
}


def test_every_registered_adapter_has_a_row() -> None:
    assert set(adapter_names()) == set(ADAPTERS)


def adapted(name: str, seed: int = 0):
    cfg, _ = ADAPTERS[name]
    model = tiny_llama()
    inject(model, build_adapter(OmegaConf.create(cfg)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every adapter off its (often identity) init
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_injection_hits_exactly_the_targets(name: str) -> None:
    model = adapted(name)
    assert [n for n, _ in adapter_layers(model)] == ADAPTERS[name][1]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_gradients_reach_exactly_the_trainable_parameters(name: str) -> None:
    model = adapted(name)
    trainable = set(trainable_parameters(model))
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    if ADAPTERS[name][1]:
        own = {f"{ln}.{pn}" for ln, layer in adapter_layers(model)
               for pn, _ in layer.named_parameters() if not pn.startswith("base_layer.")}
        assert trainable == own


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = adapted(name, seed=1)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, tmp_path / "a.safetensors")
    fresh = adapted(name, seed=2)
    load_adapter_state_dict(fresh, load_file(tmp_path / "a.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][1]])
def test_merge_equals_unmerged_and_disable_gives_base(name: str) -> None:
    model = adapted(name)
    base = tiny_llama()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        assert not torch.allclose(unmerged, base(input_ids=IDS).logits, atol=1e-4)
        merge_adapters(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
        unmerge_adapters(model)
        with disabled_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][1]])
def test_delta_weight_is_the_layer_change(name: str) -> None:
    model = adapted(name)
    for _, layer in adapter_layers(model):
        x = torch.randn(3, layer.in_features)
        dense = copy.deepcopy(layer.base_layer)
        with torch.no_grad():
            dense.weight += layer.delta_weight()
            torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)
