"""GPT-2-style Conv1D layers (y = x @ W + b, W stored in × out) under every adapter method: the adapted model equals
its merge, the merge gives back Conv1D layers of the base's own layout, and a method that cannot adapt them says so."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from petuner.adapters import adapter_layers, build_adapter, disabled_adapters, inject, unload
from petuner.adapters.conv1d import to_conv1d, to_linear
from petuner.errors import ConfigError
from tests.helpers import ADAPTERS, row_cfg

TARGETS = ["c_attn", "c_fc"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
REFUSED = {"lq_lora": r"adapter=lq_lora cannot adapt GPT-2-style Conv1D layers",
           "peft_loha": r"adapter=peft peft_type=LOHA cannot adapt GPT-2-style Conv1D layers",
           "peft": r"adapter=peft peft_type=LOHA cannot adapt GPT-2-style Conv1D layers"}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def gpt2_cfg(name: str) -> dict:
    cfg = row_cfg(name)
    if "config" in cfg:  # peft's own tuners
        cfg["config"]["target_modules"] = TARGETS
    else:
        cfg["target_modules"] = TARGETS
    return cfg


def test_conv1d_and_its_linear_compute_the_same() -> None:
    conv = tiny_gpt2().transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, 64)
    linear = to_linear(conv)
    torch.testing.assert_close(linear(x), conv(x), rtol=1e-6, atol=1e-6)
    back = to_conv1d(linear)
    assert isinstance(back, Conv1D) and torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)


@pytest.mark.parametrize("name", sorted(set(ADAPTERS) - {"none"}))
def test_every_method_adapts_conv1d_and_merges_to_the_base_layout(name: str) -> None:
    model = tiny_gpt2()
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    method = build_adapter(gpt2_cfg(name))
    if name in REFUSED:  # refused by select_targets: run.py asks it on the weightless skeleton, before any data
        with pytest.raises(ConfigError, match=REFUSED[name]):
            method.select_targets(model)
        return
    inject(model, method)
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)) == sorted(TARGETS * 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        adapted = model(input_ids=IDS).logits
        with disabled_adapters(model):
            off = model(input_ids=IDS).logits
        merged = unload(model, merge=True)(input_ids=IDS).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter does change the model
    scale = float(base.abs().max())
    if name not in ("qlora",):  # qlora's base is NF4: off is the quantized base, not the fp32 one
        torch.testing.assert_close(off, base, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4 * scale)
    for block in model.transformer.h:
        assert type(block.attn.c_attn) is Conv1D and type(block.mlp.c_fc) is Conv1D
