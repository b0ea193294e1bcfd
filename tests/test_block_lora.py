"""Block-LoRA: exactly a LoRA whose A is the shared block repeated; its parameter count; its config errors."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from petuner.adapters import adapter_layers, build_adapter, inject, trainable_parameters
from petuner.errors import ConfigError
from petuner.run import run
from tests.helpers import exports_reload, lora_cfg, tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def block_cfg(**kw):
    base = {"name": "block_lora", "r": 4, "alpha": 8, "dropout": 0.0, "n_blocks": 4,
            "target_modules": ["q_proj", "v_proj"], "scaling": "standard", "bias": "none"}
    return OmegaConf.create({**base, **kw})


def test_equals_a_lora_with_the_block_repeated_in_outputs_and_gradients() -> None:
    base = tiny_llama()
    ours, lora = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, build_adapter(block_cfg()))
    inject(lora, build_adapter(lora_cfg()))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (_, block), (_, plain) in zip(adapter_layers(ours), adapter_layers(lora), strict=True):
            block.lora_B.weight.copy_(torch.randn(block.lora_B.weight.shape, generator=g) * 0.1)
            plain.lora_B.weight.copy_(block.lora_B.weight)
            plain.lora_A.weight.copy_(torch.cat([block.lora_A.weight] * 4, dim=1))  # [A_s A_s A_s A_s]
    out_ours, out_lora = ours(input_ids=IDS, labels=IDS), lora(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out_ours.logits, out_lora.logits, atol=1e-6, rtol=0)
    out_ours.loss.backward()
    out_lora.loss.backward()
    for (_, block), (_, plain) in zip(adapter_layers(ours), adapter_layers(lora), strict=True):
        torch.testing.assert_close(block.lora_B.weight.grad, plain.lora_B.weight.grad, atol=1e-6, rtol=1e-5)
        # A_s is used n times: its gradient is the sum of the repeated blocks' gradients
        summed = plain.lora_A.weight.grad.unflatten(1, (4, -1)).sum(1)
        torch.testing.assert_close(block.lora_A.weight.grad, summed, atol=1e-6, rtol=1e-5)
        factors = block.lora_view()
        torch.testing.assert_close(factors.A, plain.lora_A.weight, atol=0, rtol=0)
        torch.testing.assert_close(block.delta_weight(), plain.delta_weight(), atol=1e-6, rtol=0)


def test_parameter_count_is_out_r_plus_r_in_over_n() -> None:
    model = tiny_llama()
    inject(model, build_adapter(block_cfg(r=4, n_blocks=8)))
    count = sum(p.numel() for p in trainable_parameters(model).values())
    # q_proj 64→64, v_proj 64→32, two layers: out·r + r·in/n
    assert count == 2 * ((64 * 4 + 4 * 64 // 8) + (32 * 4 + 4 * 64 // 8))
    lora = tiny_llama()
    inject(lora, build_adapter(lora_cfg(r=4)))
    assert sum(p.numel() for p in trainable_parameters(lora).values()) == 2 * ((64 + 64) * 4 + (32 + 64) * 4)


def test_n_blocks_must_divide_every_input_size() -> None:
    with pytest.raises(ConfigError, match=r"adapter.n_blocks=3 does not divide the input size 64 of "
                                          r"model.layers.0.self_attn.q_proj; allowed: .*1, 2, 4, 8, 16, 32, 64") as err:
        build_adapter(block_cfg(n_blocks=3)).select_targets(tiny_llama())
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"adapter.n_blocks=0: must be an integer > 0"):
        build_adapter(block_cfg(n_blocks=0))


def test_trains_and_exports_as_plain_lora(cfg_factory, tmp_path) -> None:
    info = run(cfg_factory("adapter=block_lora", "trainer.max_steps=3"))
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    config = exports_reload(tmp_path / "run", tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
