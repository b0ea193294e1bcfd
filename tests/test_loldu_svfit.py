"""LoLDU and SVFit: the decompositions, what trains (r per layer; r+1 with LoLDU's trained scale), zero pivots,
and their LoRA-form exports."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from petuner.adapters import build_adapter, inject, trainable_parameters
from petuner.adapters.loldu import LoLDULinear, ldu, leading_ldu
from petuner.errors import ConfigError, PetunerError
from petuner.run import run
from tests.helpers import exports_reload, tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CFGS = {"loldu": {"name": "loldu", "r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "svfit": {"name": "svfit", "r": 4, "target_modules": ["q_proj", "v_proj"]}}


def adapted(name: str, **options):
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject(model, build_adapter(OmegaConf.create({**CFGS[name], **options})))
    return base, model


@pytest.mark.parametrize("name, options, per_layer", [("loldu", {}, 4), ("loldu", {"train_scale": True}, 4 + 1),
                                                       ("svfit", {}, 4)])
def test_only_the_diagonal_trains_and_the_model_starts_unchanged(name: str, options: dict, per_layer: int) -> None:
    base, model = adapted(name, **options)
    assert sum(p.numel() for p in trainable_parameters(model).values()) == 4 * per_layer
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=0, rtol=0)


def test_ldu_reconstructs_the_weight() -> None:
    w = torch.randn(32, 64)
    pl, d, u = ldu(w)
    torch.testing.assert_close(pl @ torch.diag(d) @ u, w, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.diagonal(u), torch.ones(32))


def test_svfit_trains_the_top_singular_values() -> None:
    base, model = adapted("svfit")
    layer = model.model.layers[0].self_attn.q_proj
    w = base.model.layers[0].self_attn.q_proj.weight
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(layer.svfit_sigma, s[:4], atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.svfit_sigma.mul_(2.0)  # doubling σ_r adds exactly the top-r part of W once more
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(layer.delta_weight(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=0)


def test_loldu_default_trains_r_values_per_layer_and_a_fused_adamw_step_moves_all_of_them() -> None:
    """The paper's form: z alone (r per layer) trains; every tensor owns contiguous storage, so a fused
    AdamW step (which treats each parameter as one flat buffer) updates every entry of z."""
    _, model = adapted("loldu")
    layers = [m for m in model.modules() if hasattr(m, "loldu_z")]
    assert all(dict(layer.named_parameters(recurse=False)).keys() == {"loldu_z"} for layer in layers)
    for layer in layers:
        for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    before = [layer.loldu_z.detach().clone() for layer in layers]
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2, fused=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    for layer, old in zip(layers, before, strict=True):
        assert (layer.loldu_z.detach() != old).all()


def test_loldu_zero_leading_column_is_pivoted_not_nan() -> None:
    """A weight whose leading column is zero has a zero first pivot; the pivoted decomposition is finite
    and still reconstructs W's LDU part exactly at full rank."""
    w = torch.randn(6, 8)
    w[:, 0] = 0
    pl, d, a = leading_ldu(w, 6)
    assert torch.isfinite(pl).all() and torch.isfinite(a).all() and (d != 0).all()
    torch.testing.assert_close(pl @ torch.diag(d) @ a, w, atol=1e-5, rtol=0)
    layer = LoLDULinear(nn.Linear(8, 6), r=3, alpha=3)
    with torch.no_grad():
        layer.base_layer.weight[:, 0] = 0
        layer = LoLDULinear(layer.base_layer, r=3, alpha=3)
        layer.loldu_z.mul_(2.0)
    assert torch.isfinite(layer.delta_weight()).all() and torch.isfinite(layer(torch.randn(2, 8))).all()


def test_loldu_weight_of_rank_below_r_is_one_line() -> None:
    w = torch.randn(6, 2) @ torch.randn(2, 8)  # rank 2
    with pytest.raises(PetunerError, match=r"rank below adapter\.r=3"):
        leading_ldu(w, 3)


def test_loldu_bad_train_scale_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.train_scale=.yes.: must be true or false"):
        build_adapter(OmegaConf.create({**CFGS["loldu"], "train_scale": "yes"}))


def test_loldu_update_is_scale_times_the_ldu_part() -> None:
    base, model = adapted("loldu", train_scale=True)
    layer = model.model.layers[1].self_attn.v_proj
    pl, d, u = ldu(base.model.layers[1].self_attn.v_proj.weight)
    torch.testing.assert_close(layer.loldu_z, d[:4], atol=1e-5, rtol=0)
    assert layer.loldu_scale.item() == 1.0  # alpha / r
    with torch.no_grad():
        layer.loldu_scale.fill_(3.0)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * pl[:, :4] @ torch.diag(d[:4]) @ u[:4], atol=1e-5, rtol=0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert layer.loldu_scale.grad is not None and layer.loldu_z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["loldu", "svfit"])
def test_rank_above_the_layer_is_one_line(name: str) -> None:
    with pytest.raises(ConfigError, match=r"adapter.r=65 exceeds the size of .*allowed: 1\.\.64") as err:
        build_adapter(OmegaConf.create({**CFGS[name], "r": 65})).select_targets(tiny_llama())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["loldu", "svfit"])
def test_trains_and_exports_merged_and_as_peft_lora(name: str, cfg_factory, tmp_path) -> None:
    # 32 trainable numbers move a random model's loss by thousandths: enough steps that it is a trend.
    info = run(cfg_factory(f"adapter={name}", "trainer.max_steps=10", "optimizer.lr=5e-2"))
    assert info["trainable_parameters"] == 4 * 8  # q, v in 2 layers, r = 8
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    config = exports_reload(tmp_path / "run", tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
