"""LoRA math: parity with peft's LoRA, merge/unmerge, disable, target selection."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from petuner.adapters import (
    adapter_layers,
    build_adapter,
    disabled_adapters,
    inject,
    merge_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from petuner.adapters.targets import match_targets
from petuner.errors import ConfigError
from tests.helpers import lora_cfg, tiny_llama


def randomize_b(model: torch.nn.Module) -> None:
    """B starts at zero; give it values so that the adapter actually changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def petuner_and_peft(scaling: str = "standard", targets=("q_proj", "v_proj")):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    inject(ours, build_adapter(lora_cfg(scaling=scaling, target_modules=list(targets))))
    randomize_b(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), use_rslora=scaling == "rslora"))
    state = {f"base_model.model.{k}".replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in ours.state_dict().items() if "lora_" in k}
    missing = theirs.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return base, ours, theirs


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_outputs_and_gradients_match_peft(scaling: str) -> None:
    _, ours, theirs = petuner_and_peft(scaling)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out_ours = ours(input_ids=ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    ours_grads = {k: p.grad for k, p in trainable_parameters(ours).items()}
    theirs_grads = {k.removeprefix("base_model.model.").replace(".default", ""): p.grad
                    for k, p in theirs.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[key], atol=1e-6, rtol=1e-5)


def test_scaling_and_init_follow_the_paper() -> None:
    model = tiny_llama()
    inject(model, build_adapter(lora_cfg(r=4, alpha=8)))
    for _, layer in adapter_layers(model):
        assert layer.scaling == 2.0
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert layer.lora_A.weight.abs().max() <= 1 / layer.in_features ** 0.5 + 1e-7  # kaiming_uniform(a=√5)
    rs = tiny_llama()
    inject(rs, build_adapter(lora_cfg(r=4, alpha=8, scaling="rslora")))
    assert all(layer.scaling == 4.0 for _, layer in adapter_layers(rs))


def test_zero_init_adapter_leaves_the_model_unchanged() -> None:
    base = tiny_llama()
    adapted = copy.deepcopy(base)
    inject(adapted, build_adapter(lora_cfg()))
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(adapted(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0)


def test_merge_unmerge_disable() -> None:
    base, ours, _ = petuner_and_peft()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        original = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
        merge_adapters(ours)
        assert all(layer.merged for _, layer in adapter_layers(ours))
        torch.testing.assert_close(ours(input_ids=ids).logits, unmerged, atol=1e-5, rtol=0)
        with disabled_adapters(ours):
            torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert all(layer.merged for _, layer in adapter_layers(ours))  # restored after the block
        unmerge_adapters(ours)
        for name, p in ours.named_parameters():
            if "base_layer" in name:
                torch.testing.assert_close(p, original[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(input_ids=ids).logits, unmerged, atol=1e-6, rtol=0)
        plain = unload(copy.deepcopy(ours))
        assert not list(adapter_layers(plain))
        assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged, atol=1e-5, rtol=0)


def test_only_adapter_parameters_train() -> None:
    model = tiny_llama()
    inject(model, build_adapter(lora_cfg()))
    names = set(trainable_parameters(model))
    assert names == {f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                     for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}
    ids = torch.randint(0, 128, (2, 10))
    randomize_b(model)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names


@pytest.mark.parametrize("bias", ["all", "lora_only", "none"])
def test_bias_option_selects_biases(bias: str) -> None:
    torch.manual_seed(0)
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50))
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    inject(model, build_adapter(lora_cfg(target_modules=["query", "value"], bias=bias)))
    trained = {n for n in trainable_parameters(model) if n.endswith("bias")}
    if bias == "none":
        assert trained == set()
    elif bias == "lora_only":
        assert trained == {f"encoder.layer.0.attention.self.{m}.base_layer.bias" for m in ("query", "value")}
    else:
        assert len(trained) == len(all_biases)


def test_target_matching_follows_peft() -> None:
    model = tiny_llama()
    names = match_targets(model, ["q_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert match_targets(model, r"model\.layers\.1\..*_proj") == [
        f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    everything = match_targets(model, "all-linear")
    assert "lm_head" not in everything and len(everything) == 14


@pytest.mark.parametrize("spec, message", [
    (["qproj"], "matches no linear layer"),
    ("attn\\.(", "not a valid regex"),
])
def test_bad_targets_are_one_clear_line(spec, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_adapter(lora_cfg(target_modules=spec)).select_targets(tiny_llama())
    assert "\n" not in str(err.value)


def test_rank_above_layer_size_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"adapter.r=100 exceeds the size of .*allowed: 1\.\.64"):
        build_adapter(lora_cfg(r=100, target_modules=["q_proj"])).select_targets(tiny_llama())
