"""LoRA's variants against peft's implementation of the same config, on the same weights: DoRA, PiSSA,
rsLoRA, Gaussian init; and their exports reloaded by peft and transformers."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import petuner
from petuner.adapters import adapter_layers, build_adapter, disabled_adapters, inject, trainable_parameters
from petuner.errors import ConfigError
from petuner.run import run
from tests.helpers import exports_reload, lora_cfg, tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
PEFT_SEGMENTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def peft_name(name: str) -> str:
    """petuner's parameter name → peft's (PeftModel prefix, adapter name after the module)."""
    for seg in PEFT_SEGMENTS:
        name = name.replace(f".{seg}.", f".{seg}.default.")
    return "base_model.model." + name


def pair(seed_init: bool = False, **variant):
    """petuner and peft adapters of the same config on copies of one tiny Llama; petuner's trainable
    parameters are moved off their init and copied into peft's."""
    base = tiny_llama()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    init = variant.get("init", "kaiming")
    torch.manual_seed(7)
    inject(ours, build_adapter(lora_cfg(**variant)))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        use_rslora=variant.get("scaling") == "rslora", use_dora=variant.get("variant") == "dora",
        init_lora_weights={"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}[init]))
    theirs_params = dict(theirs.named_parameters())
    if seed_init:  # same seed, same draw order: the inits themselves must agree
        for name, p in ours.named_parameters():
            other = theirs_params[peft_name(name)] if name in trainable_parameters(ours) else \
                theirs_params["base_model.model." + name]
            torch.testing.assert_close(p, other, atol=1e-6, rtol=0, msg=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainable_parameters(ours).items():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
            theirs_params[peft_name(name)].copy_(p)
    return base, ours, theirs


def assert_same_outputs_and_gradients(ours, theirs) -> None:
    out_ours, out_theirs = ours(input_ids=IDS, labels=IDS), theirs(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    ours_trainable = trainable_parameters(ours)
    assert {peft_name(n) for n in ours_trainable} == {n for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours_trainable.items():
        torch.testing.assert_close(p.grad, theirs_params[peft_name(name)].grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", [
    {"variant": "dora"},
    {"variant": "dora", "scaling": "rslora"},
    {"init": "pissa"},
    {"init": "pissa", "scaling": "rslora"},
    {"scaling": "rslora"},
    {"init": "gaussian"},
    {"init": "pissa", "variant": "dora"},
])
def test_outputs_and_gradients_match_peft(variant: dict) -> None:
    _, ours, theirs = pair(seed_init=True, **variant)
    assert_same_outputs_and_gradients(ours, theirs)


def test_pissa_moves_the_top_singular_part_into_the_factors() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject(model, build_adapter(lora_cfg(init="pissa")))
    layer = model.model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    u, s, vh = torch.linalg.svd(original)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight(), top, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, original - top, atol=1e-5, rtol=0)
    with torch.no_grad():  # unchanged at init, and disabled means the original model, not the residual
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)
        layer.lora_B.weight.add_(0.1)
        with disabled_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)
    factors = layer.lora_view()  # relative to the original W: rank 2r
    assert factors.A.shape == (8, 64)
    torch.testing.assert_close(original + factors.scaling * factors.B @ factors.A,
                               layer.base_layer.weight + layer.delta_weight(), atol=1e-5, rtol=0)


def test_dora_starts_at_the_base_and_rescales_rows() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject(model, build_adapter(lora_cfg(variant="dora")))
    layer = model.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(layer.lora_magnitude_vector.weight, base.model.layers[0].self_attn.v_proj.weight.norm(
        dim=1), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)
        layer.lora_magnitude_vector.weight.mul_(2.0)  # doubling m doubles the layer's output
        x = torch.randn(3, 64)
        torch.testing.assert_close(layer(x), 2 * layer.base_layer(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, value, message", [
    ("init", "svd", "adapter.init='svd': allowed: kaiming, gaussian, pissa"),
    ("variant", "vera", "adapter.variant='vera': allowed: standard, dora"),
])
def test_bad_variant_options_are_one_line(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_adapter(lora_cfg(**{key: value}))
    assert "\n" not in str(err.value)


def test_dora_exports_as_peft_dora(cfg_factory, tmp_path) -> None:
    run(cfg_factory("adapter.variant=dora", "trainer.max_steps=2"))
    config = exports_reload(tmp_path / "run", tmp_path)
    assert config["use_dora"] is True and config["r"] == 8


def test_pissa_exports_as_a_rank_2r_lora_on_the_original_base(cfg_factory, tmp_path) -> None:
    run(cfg_factory("adapter.init=pissa", "adapter.scaling=rslora", "trainer.max_steps=2"))
    config = exports_reload(tmp_path / "run", tmp_path)
    assert config["r"] == 16 and config["use_dora"] is False and config["init_lora_weights"] is True
    model, _ = petuner.load(tmp_path / "run")
    assert all(layer.pissa for _, layer in adapter_layers(model))
