"""DyLoRA: truncation equals a rank-b LoRA, frozen-mode gradients, seeded rank draws, rank exports."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from torch import nn

import petuner
from petuner.adapters.dylora import DyLoRALinear, FrozenComponents, RankDraw
from petuner.adapters.lora import LoRALinear
from petuner.errors import PetunerError
from petuner.export import export
from petuner.models import load_model
from petuner.rank_eval import eval_ranks
from petuner.run import run
from petuner.run_folder import read_config
from petuner.train.hooks import TrainState
from petuner.train.logging import read_metrics
from tests.conftest import make_cfg
from tests.helpers import DPO, tiny_llama


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


@pytest.mark.parametrize("mode", ["frozen", "frozen_reference", "unfrozen"])
def test_frozen_mode_trains_only_component_b_minus_1(mode: str) -> None:
    layer = dylora_layer(mode)
    layer.active_rank, layer.training_step = 4, True
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    rows_with_grad = (layer.lora_A.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    cols_with_grad = (layer.lora_B.weight.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
    expected = [0, 1, 2, 3] if mode == "unfrozen" else [3]
    assert rows_with_grad == expected and cols_with_grad == expected


def adamw_steps(mode: str, ranks: list[int]) -> tuple[list[dict[str, torch.Tensor]], torch.optim.Optimizer]:
    """Parameters (and AdamW's moments) after each loop-ordered step at the given ranks."""
    layer = dylora_layer(mode)
    model = nn.Sequential(layer)
    hook = RankDraw(model, r=6, weights=None, mode=mode)
    draws = iter(ranks)
    hook.draw = lambda: next(draws)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.1, weight_decay=0.1)
    state = TrainState(model=model, optimizer=optimizer, max_steps=len(ranks))
    snapshots = [{"A": layer.lora_A.weight.detach().clone(), "B": layer.lora_B.weight.detach().clone()}]
    for _ in ranks:
        hook.before_step(state)
        model(torch.randn(5, 16)).pow(2).sum().backward()
        hook.after_backward(state)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        hook.after_optimizer_step(state)
        moments = optimizer.state[layer.lora_A.weight]
        snapshots.append({"A": layer.lora_A.weight.detach().clone(), "B": layer.lora_B.weight.detach().clone(),
                          "m": moments["exp_avg"].clone(), "v": moments["exp_avg_sq"].clone()})
    return snapshots, optimizer


def test_frozen_mode_leaves_other_components_and_their_moments_unchanged_by_adamw() -> None:
    """A step at b=4 then one at b=2: each step changes only component b-1 (A's row, B's column), though
    AdamW has momentum and weight decay; the moments of the other rows do not decay either."""
    init, after_4, after_2 = adamw_steps("frozen", [4, 2])[0]
    def pick(t: torch.Tensor, dim: int, rows: list[int]) -> torch.Tensor:
        return t.index_select(dim, torch.tensor(rows))

    for key, dim in (("A", 0), ("B", 1)):
        assert torch.equal(pick(after_4[key], dim, [0, 1, 2, 4, 5]), pick(init[key], dim, [0, 1, 2, 4, 5]))
        assert not torch.equal(pick(after_4[key], dim, [3]), pick(init[key], dim, [3]))
        assert torch.equal(pick(after_2[key], dim, [0, 2, 3, 4, 5]), pick(after_4[key], dim, [0, 2, 3, 4, 5]))
        assert not torch.equal(pick(after_2[key], dim, [1]), pick(after_4[key], dim, [1]))
    for moment in ("m", "v"):
        assert torch.equal(after_2[moment][3], after_4[moment][3])  # row 3's moments did not decay at b=2
        assert after_4[moment][3].abs().sum() > 0


def test_frozen_reference_mode_lets_adamw_move_the_rows_without_gradient() -> None:
    """The reference code's form (gradient detached only): momentum and weight decay move row 3 at b=2."""
    _, after_4, after_2 = adamw_steps("frozen_reference", [4, 2])[0]
    assert not torch.equal(after_2["A"][3], after_4["A"][3])
    assert not torch.equal(after_2["A"][0], after_4["A"][0])  # weight decay alone


def test_frozen_mode_refuses_an_optimizer_whose_state_is_not_per_weight() -> None:
    layer = dylora_layer("frozen")
    optimizer = torch.optim.AdamW(layer.adapter_parameters())
    optimizer.state[layer.lora_A.weight] = {"absmax": torch.ones(3)}
    with pytest.raises(PetunerError, match="frozen_reference"):
        FrozenComponents([layer]).save(optimizer)


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


def test_eval_ranks_refuses_a_preference_run_in_one_line(tmp_path) -> None:
    """A DPO run's pairs are scored by its objective and reference (petuner eval), not the model's own loss."""
    run_dir = tmp_path / "dpo"
    run(make_cfg(run_dir, "adapter=dylora", *DPO, "trainer.max_steps=1", "trainer.save_every=null"))
    with pytest.raises(PetunerError, match=r"^eval-ranks .* this run trained with loss=dpo \(score its pairs"):
        eval_ranks(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
