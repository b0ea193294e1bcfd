"""DyLoRA: truncation equals a rank-b LoRA, frozen-mode gradients, seeded rank draws, rank exports."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from torch import nn

import petuner
from petuner.adapters.dylora import DyLoRALinear
from petuner.adapters.lora import LoRALinear
from petuner.export import export
from petuner.models import load_model
from petuner.rank_eval import eval_ranks
from petuner.run import run
from petuner.run_folder import read_config
from petuner.train.logging import read_metrics
from tests.helpers import tiny_llama


def dylora_layer(mode: str = "frozen") -> DyLoRALinear:
    torch.manual_seed(0)
    layer = DyLoRALinear(nn.Linear(16, 12), r=6, alpha=12, mode=mode)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


@pytest.mark.parametrize("b", [1, 3, 6])
def test_rank_b_equals_a_rank_b_lora_from_truncated_factors(b: int) -> None:
    layer = dylora_layer()
    layer.active_rank = b
    plain = LoRALinear(layer.base_layer, r=b, alpha=12)
    with torch.no_grad():
        plain.lora_A.weight.copy_(layer.lora_A.weight[:b])
        plain.lora_B.weight.copy_(layer.lora_B.weight[:, :b])
    assert layer.scaling == plain.scaling == 12 / b
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), plain.delta_weight(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["frozen", "unfrozen"])
def test_frozen_mode_trains_only_component_b_minus_1(mode: str) -> None:
    layer = dylora_layer(mode)
    layer.active_rank, layer.training_step = 4, True
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    rows_with_grad = (layer.lora_A.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    cols_with_grad = (layer.lora_B.weight.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
    expected = [3] if mode == "frozen" else [0, 1, 2, 3]
    assert rows_with_grad == expected and cols_with_grad == expected


def ranks_drawn(run_dir) -> list[int]:
    return [m["dylora/rank"] for m in read_metrics(run_dir) if "dylora/rank" in m]


def test_ranks_are_seeded_and_survive_resume(cfg_factory, tmp_path, resume_check) -> None:
    overrides = ("adapter=dylora", "trainer.max_steps=6")
    run(cfg_factory(*overrides, run_dir=tmp_path / "a"))
    run(cfg_factory(*overrides, run_dir=tmp_path / "b"))
    run(cfg_factory(*overrides, "trainer.seed=7", run_dir=tmp_path / "c"))
    assert ranks_drawn(tmp_path / "a") == ranks_drawn(tmp_path / "b") != ranks_drawn(tmp_path / "c")
    assert len(set(ranks_drawn(tmp_path / "a"))) > 1 and all(1 <= b <= 8 for b in ranks_drawn(tmp_path / "a"))

    _, resumed = resume_check(*overrides)
    assert ranks_drawn(resumed) == ranks_drawn(tmp_path / "a")


@pytest.fixture(scope="module")
def dylora_run(tmp_path_factory):
    from tests.conftest import make_cfg

    run_dir = tmp_path_factory.mktemp("dylora") / "run"
    run(make_cfg(run_dir, "adapter=dylora", "adapter.r=4", "trainer.max_steps=8", "adapter.eval_all_ranks=true"))
    return run_dir


IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rank", [1, 3])
def test_export_at_rank_b_is_a_plain_rank_b_lora(dylora_run, tmp_path, rank: int) -> None:
    loaded = petuner.load(dylora_run)
    from petuner.run_folder import load

    run_ = load(dylora_run)
    run_.method.set_rank(run_.model, rank)
    with torch.no_grad():
        ours = run_.model(input_ids=IDS).logits
        full = loaded[0](input_ids=IDS).logits
    assert (ours - full).abs().max() > 1e-6  # the truncation matters

    out = export(dylora_run, "peft", tmp_path / "peft", rank=rank)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (rank, 16, {})
    base = load_model(read_config(dylora_run).model)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=IDS).logits
    assert (theirs - ours).abs().max() <= 1e-5

    from transformers import AutoModelForCausalLM

    merged = export(dylora_run, "merged", tmp_path / "merged", rank=rank)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=IDS).logits
    assert (plain - ours).abs().max() <= 1e-4


def test_rank_out_of_range_is_one_line(dylora_run, tmp_path) -> None:
    with pytest.raises(petuner.errors.PetunerError, match=r"rank 9 is out of range .* allowed: 1\.\.4"):
        export(dylora_run, "peft", tmp_path / "x", rank=9)


def test_eval_ranks_writes_table_and_plot(dylora_run, tmp_path) -> None:
    rows = eval_ranks(dylora_run, tmp_path)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "rank_eval.json").read_text()) == rows
    assert (tmp_path / "rank_eval.md").read_text().count("\n") == 6
    assert (tmp_path / "rank_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = [m for m in read_metrics(dylora_run) if "eval/loss" in m][-1]  # eval_all_ranks during training
    for row in rows:
        key = "eval/loss" if row["rank"] == 4 else f"eval/loss@r{row['rank']}"
        assert row["eval/loss"] == pytest.approx(final[key], abs=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_lora_view_at_every_active_rank_is_the_layer_update(rank: int) -> None:
    """The view a DyLoRA layer gives of its update at active rank b is the rank-b LoRA it computes (the inherited
    full-rank factors at scale alpha/b were wrong below full rank)."""
    from petuner.adapters import adapter_layers, build_adapter, inject

    model = tiny_llama()
    method = build_adapter({"name": "dylora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]})
    inject(model, method)
    method.set_rank(model, rank)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.weight.normal_()
            view = layer.lora_view()
            assert view.A.shape[0] == rank and view.scaling == 8 / rank
            torch.testing.assert_close(view.scaling * view.B @ view.A, layer.delta_weight(), atol=1e-6, rtol=0)
