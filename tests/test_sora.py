"""SoRA: the proximal operator, gates kept out of the main optimizer, pruned export equal to the gated model."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from torch import nn

import petuner
from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.adapters.sora import ProximalGateStep, SoRALinear, soft_threshold, xi_at
from petuner.errors import ConfigError
from petuner.export import export
from petuner.models import load_model
from petuner.run import run
from petuner.run_folder import read_config
from petuner.train.hooks import TrainState
from petuner.train.logging import read_metrics
from petuner.train.loop import Loop
from tests.helpers import tiny_llama

SORA = {"name": "sora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "gate_init": "ones", "gate_optimizer": "sgd", "gate_lr": 0.1, "xi": 0.5, "xi_schedule": "constant",
        "xi_final": 1.0, "xi_steps": 2}


def test_soft_threshold_is_the_l1_proximal_operator() -> None:
    x = torch.tensor([-2.0, -0.3, -0.1, 0.0, 0.05, 0.2, 1.5])
    t = 0.2
    grid = torch.linspace(-3, 3, 60001)
    brute = torch.stack([grid[torch.argmin(0.5 * (grid - v) ** 2 + t * grid.abs())] for v in x])
    torch.testing.assert_close(soft_threshold(x, t), brute, atol=2e-4, rtol=0)  # grid spacing 1e-4
    assert soft_threshold(x, t).tolist() == pytest.approx([-1.8, -0.1, 0.0, 0.0, 0.0, 0.0, 1.3])


def test_gate_step_is_sgd_then_soft_threshold() -> None:
    model = tiny_llama()
    method = build_adapter(OmegaConf.create(SORA))
    inject(model, method)
    layers = [layer for _, layer in adapter_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.weight.normal_()
            layer.gate.copy_(torch.tensor([1.0, 0.02, -0.5, 0.04]))
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = [soft_threshold(layer.gate - 0.1 * layer.gate.grad, 0.1 * 0.5) for layer in layers]
    (hook,) = method.hooks(model)
    hook.after_optimizer_step(TrainState(model=model, optimizer=None, max_steps=10, step=1))
    for layer, want in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.gate.detach(), want.detach())
        assert layer.gate.grad is None


def test_gates_never_enter_the_main_optimizer(cfg_factory, monkeypatch) -> None:
    captured = {}
    original = Loop.train

    def spy(self, start_step=0):
        captured["loop"] = self
        return original(self, start_step)

    monkeypatch.setattr(Loop, "train", spy)
    run(cfg_factory("adapter=sora", "optimizer.weight_decay=0.1", "trainer.max_steps=2"))
    loop = captured["loop"]
    gates = {id(layer.gate) for _, layer in adapter_layers(loop.model)}
    in_main = {id(p) for group in loop.optimizer.param_groups for p in group["params"]}
    assert gates and not gates & in_main
    others = {id(p) for p in loop.model.parameters() if p.requires_grad} - gates
    assert others == in_main
    (hook,) = [h for h in loop.hooks if isinstance(h, ProximalGateStep)]
    assert {id(p) for p in hook.optimizer.param_groups[0]["params"]} == gates
    assert hook.optimizer.param_groups[0]["weight_decay"] == 0


def test_xi_schedules() -> None:
    cfg = OmegaConf.create({**SORA, "xi": 0.0, "xi_final": 1.0, "xi_steps": 4})
    assert [xi_at(cfg, s, 100) for s in (0, 50, 100)] == [0.0, 0.0, 0.0]
    cfg.xi_schedule = "linear"
    assert [xi_at(cfg, s, 101) for s in (0, 50, 100)] == [0.0, 0.5, 1.0]  # the last step trains at xi_final
    cfg.xi_schedule = "step"
    xis = [xi_at(cfg, s, 100) for s in range(100)]  # every step index of a 100-step run
    assert sorted(set(xis)) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert all(xis.count(x) == 25 for x in set(xis))  # four equal stages, xi_final's included
    assert xis == sorted(xis) and xis[-25:] == [1.0] * 25


def test_step_schedule_needs_two_stages() -> None:
    with pytest.raises(ConfigError, match="xi_steps=1"):
        build_adapter(OmegaConf.create({**SORA, "xi_schedule": "step", "xi_steps": 1}))


def test_gate_lr_follows_the_main_schedule_and_each_xi_stage_trains(tmp_path) -> None:
    """Warmup then cosine decay: the gates' learning rate (and so the threshold) is gate_lr times the main
    schedule's factor at each step, as in the reference training script; the step schedule's 3 stages get
    2 of the 6 steps each, xi_final's included."""
    from tests.conftest import make_cfg

    run_dir = tmp_path / "run"
    run(make_cfg(run_dir, "adapter=sora", "adapter.gate_lr=0.05", "optimizer.warmup_steps=2",
                 "trainer.save_every=null", "adapter.xi_schedule=step", "adapter.xi=0.1", "adapter.xi_final=0.3",
                 "adapter.xi_steps=3"))
    logged = [m for m in read_metrics(run_dir) if "sora/gate_lr" in m]
    assert len(logged) == 6
    factors = [m["sora/gate_lr"] / 0.05 for m in logged]
    assert factors == pytest.approx([m["train/lr"] / 1e-2 for m in logged], rel=1e-6)
    assert factors[:3] == pytest.approx([0.0, 0.5, 1.0]) and factors[-1] < 0.2  # warmup from 0, then decay
    assert [m["sora/xi"] for m in logged] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3])


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    from tests.conftest import make_cfg

    run_dir = tmp_path_factory.mktemp("sora") / "run"
    run(make_cfg(run_dir, "adapter=sora", "adapter.gate_init=randn", "adapter.xi=0.5", "adapter.gate_lr=0.05",
                 "adapter.xi_schedule=linear", "adapter.xi_final=3.0", "trainer.max_steps=8", "trainer.eval_every=4"))
    return run_dir


def test_training_prunes_gates_and_logs_the_curve(sparse_run) -> None:
    model, _ = petuner.load(sparse_run)
    nonzero = [layer.nonzero_ranks() for _, layer in adapter_layers(model)]
    assert 0 < sum(nonzero) < 4 * 8 and len(set(nonzero)) > 1  # 4 layers of rank 8: pruned, unevenly
    evals = [m for m in read_metrics(sparse_run) if "eval/loss" in m]
    assert [m["sora/nonzero_ranks"] for m in evals][-1] == sum(nonzero)
    assert [m["sora/nonzero_ranks"] for m in evals] == sorted((m["sora/nonzero_ranks"] for m in evals), reverse=True)
    curve = json.loads((sparse_run / "sora_curve.json").read_text())
    assert [p["step"] for p in curve] == [0, 4, 8] and curve[-1]["eval/loss"] == evals[-1]["eval/loss"]
    assert "| non-zero ranks |" in (sparse_run / "sora_curve.md").read_text()


def test_pruned_export_equals_the_gated_model_and_reloads_in_peft(sparse_run, tmp_path) -> None:
    model, _ = petuner.load(sparse_run)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = export(sparse_run, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    nonzero = {name: layer.nonzero_ranks() for name, layer in adapter_layers(model)}
    kept = {n: r for n, r in nonzero.items() if r}
    assert sorted(config["target_modules"]) == sorted(kept)
    assert {n: config["rank_pattern"].get(n, config["r"]) for n in kept} == kept
    base = load_model(read_config(sparse_run).model)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
        ours = model(input_ids=ids).logits
    assert (theirs - ours).abs().max() <= 1e-5


def test_sora_layer_with_all_gates_on_is_a_lora() -> None:
    torch.manual_seed(0)
    layer = SoRALinear(nn.Linear(8, 6), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 8)
    expected = layer.base_layer(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    torch.testing.assert_close(layer(x), expected)
