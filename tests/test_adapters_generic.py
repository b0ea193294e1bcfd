"""Every registered adapter through the same tests. A new method adds one row to ADAPTERS."""

from __future__ import annotations

import copy

import pytest
import torch
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
    unload,
    unmerge_adapters,
)
from petuner.config import group_choices
from tests.helpers import shipped, tiny_llama

# row → (YAML in conf/adapter/, overrides of its shipped values, modules it must wrap in the tiny Llama).
# The YAMLs are composed as shipped (target_modules: the tiny Llama's lora_targets, q_proj and v_proj);
# only sizes shrink, and dropout goes to zero where the row compares outputs exactly.
QV = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
SMALL = ("r=4", "alpha=8", "dropout=0.0")
ADAPTERS = {
    "lora": ("lora", SMALL, QV),
    "none": ("none", (), []),
    "dylora": ("dylora", SMALL, QV),
    "sora": ("sora", SMALL, QV),
    "qlora": ("qlora", SMALL, QV),
    "lq_lora": ("lq_lora", (*SMALL, "bits=3", "iterations=3", "calibration_batches=1"), QV),
    "lora_dora": ("lora", (*SMALL, "variant=dora"), QV),
    "lora_pissa": ("lora", (*SMALL, "scaling=rslora", "init=pissa"), QV),
    "block_lora": ("block_lora", (*SMALL, "n_blocks=4"), QV),
    "loldu": ("loldu", ("r=4", "alpha=4"), QV),
    "svfit": ("svfit", ("r=4",), QV),
    # peft's own tuners through adapter=peft (the ready configs adapter=loha / adalora / vera)
    "peft": ("peft", ("config.r=4", "config.alpha=8"), QV),
    "peft_loha": ("loha", ("config.r=4", "config.alpha=8"), QV),
    "peft_adalora": ("adalora", ("config.init_r=4", "config.target_r=2", "config.total_step=10",
                                "config.lora_dropout=0.0"), QV),
    "peft_vera": ("vera", ("config.r=8",), QV),
}


def row_cfg(name: str) -> dict:
    yaml, overrides, _ = ADAPTERS[name]
    return shipped("adapter", yaml, *overrides)


# Rows whose frozen base is quantized: with the adapter off the model is that quantized base (not the fp32
# tiny Llama), and the base layer as a dense Linear holds the dequantized weight (``layer.base_weight()``).
QUANTIZED_BASE = {"qlora", "lq_lora"}


def test_every_registered_adapter_and_shipped_yaml_has_a_row() -> None:
    assert set(adapter_names()) == {row_cfg(name)["name"] for name in ADAPTERS}
    assert set(group_choices("adapter")) == {yaml for yaml, _, _ in ADAPTERS.values()}


def adapted(name: str, seed: int = 0):
    model = tiny_llama()
    inject(model, build_adapter(row_cfg(name)))
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
    assert [n for n, _ in adapter_layers(model)] == ADAPTERS[name][2]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_gradients_reach_exactly_the_trainable_parameters(name: str) -> None:
    model = adapted(name)
    trainable = set(trainable_parameters(model))
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    if ADAPTERS[name][2]:
        # a layer's own parameters (what ``adapter_parameters`` returns: for petuner's layers everything
        # outside base_layer; for peft's, what peft trains)
        own = {f"{ln}.{pn}" for ln, layer in adapter_layers(model)
               for pn, p in layer.named_parameters() if any(p is q for q in layer.adapter_parameters())}
        assert trainable == own


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = adapted(name, seed=1)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, tmp_path / "a.safetensors")
    fresh = adapted(name, seed=2)
    load_adapter_state_dict(fresh, load_file(tmp_path / "a.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][2]])
def test_merge_equals_unmerged_and_disable_gives_base(name: str) -> None:
    model = adapted(name)
    base = unload(copy.deepcopy(model), merge=False) if name in QUANTIZED_BASE else tiny_llama()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        assert not torch.allclose(unmerged, base(input_ids=IDS).logits, atol=1e-4)
        merge_adapters(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
        unmerge_adapters(model)
        with disabled_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][2]])
def test_delta_weight_is_the_layer_change(name: str) -> None:
    model = adapted(name)
    for _, layer in adapter_layers(model):
        x = torch.randn(3, layer.in_features)
        if name in QUANTIZED_BASE:
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.base_layer.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(layer.base_weight())
        else:
            dense = copy.deepcopy(layer.base_layer)
        with torch.no_grad():
            dense.weight += layer.delta_weight()
            torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][2]])
def test_lora_view_is_the_layer_update(name: str) -> None:
    """Where a layer's update is a LoRA, its one view of it (relative to the original base weight) is exact."""
    model = adapted(name)
    base = dict(tiny_llama().named_modules())
    for layer_name, layer in adapter_layers(model):
        view = layer.lora_view()
        if view is None or view.extra or name in QUANTIZED_BASE:
            continue  # no LoRA form; DoRA's magnitude and quantized bases are checked through the export below
        with torch.no_grad():  # the original weight plus the view is the adapted layer's weight
            torch.testing.assert_close(base[layer_name].weight + view.scaling * view.B @ view.A,
                                       layer.base_layer.weight + layer.delta_weight(), atol=1e-5, rtol=0)


LORA_SHAPED = [n for n in sorted(ADAPTERS)
               if build_adapter(row_cfg(n)).peft_options() is not None and n not in QUANTIZED_BASE]


@pytest.mark.parametrize("name", LORA_SHAPED)
def test_peft_export_reloads_in_peft_with_the_same_logits(name: str, tmp_path) -> None:
    """Every method whose update is a LoRA: its peft form, written as the export writes it and reloaded by
    peft's own PeftModel.from_pretrained over the original base, gives the adapted model's logits."""
    from peft import PeftModel

    from petuner.adapters.peft_form import lora_config, lora_state_dict, lora_views

    method = build_adapter(row_cfg(name))
    model = tiny_llama()
    inject(model, method)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    factors = {n: v for n, v in lora_views(model).items() if v is not None and v.A.shape[0] > 0}
    assert factors and len(factors) == len(ADAPTERS[name][2])
    lora_config(factors, method.peft_options(), "causal_lm", [], None).save_pretrained(str(tmp_path))
    save_file({k: v.detach().contiguous() for k, v in lora_state_dict(model, factors).items()},
              tmp_path / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=0)
