"""The loop end to end on tiny models: what trains, what is saved, loss, resume, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from petuner.adapters import build_adapter, inject
from petuner.errors import PetunerError
from petuner.models import head_modules, load_model
from petuner.run import run
from petuner.run_folder import read_config
from petuner.train.checkpoint import checkpoints
from petuner.train.logging import read_metrics
from petuner.train.loop import Loop


def spy_model(monkeypatch) -> dict:
    captured: dict = {}
    original = Loop.train

    def train(self, start_step=0):
        captured["model"] = self.model
        return original(self, start_step)

    monkeypatch.setattr(Loop, "train", train)
    return captured


def test_only_adapter_parameters_change(cfg_factory, monkeypatch) -> None:
    cfg = cfg_factory("trainer.max_steps=3")
    captured = spy_model(monkeypatch)
    run(cfg)
    trained = captured["model"].cpu()
    fresh = load_model(cfg.model)
    inject(fresh, build_adapter(cfg.adapter), head_modules(fresh, cfg.model.task))
    before = dict(fresh.named_parameters())
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert changed == {n for n in trainable if ".lora_" in n}  # B from zero, A by its gradient
    assert trainable and all(".lora_" in n for n in trainable)


def test_run_folder_holds_config_metrics_weights_checkpoints(trained_run) -> None:
    for name in ("config.yaml", "run.json", "adapter.safetensors", "metrics.jsonl"):
        assert (trained_run / name).is_file()
    info = json.loads((trained_run / "run.json").read_text())
    saved = load_file(trained_run / "adapter.safetensors")
    assert info["trainable_parameters"] == sum(t.numel() for t in saved.values())
    assert 0 < info["trainable_parameters"] < info["total_parameters"]
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    metrics = read_metrics(trained_run)
    steps = [m["step"] for m in metrics if "train/loss" in m]
    assert steps == list(range(1, 7))
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm"} <= set(metrics[1])
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 6]
    assert [c.name for c in checkpoints(trained_run)] == ["step-00000003", "step-00000006"]


def test_full_finetuning_loss_falls_on_real_data(cfg_factory) -> None:
    info = run(cfg_factory("adapter=none", "optimizer.lr=1e-2", "trainer.max_steps=20", "trainer.save_every=null"))
    assert info["trainable_parameters"] == info["total_parameters"]
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"] - 1.0


def test_classification_trains_head_and_reports_accuracy(trained_cls_run) -> None:
    info = json.loads((trained_cls_run / "run.json").read_text())
    assert info["head_modules"] == ["classifier"]
    assert info["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    saved = load_file(trained_cls_run / "adapter.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
    # The head left its (init_seed-seeded) fresh init, and 6 steps lifted held-out accuracy (2/16 -> 5/16).
    # Seen to fail with the head left out of the optimizer (param_groups skipping it): its weights equal the init.
    fresh = load_model(read_config(trained_cls_run).model, num_labels=5).classifier
    for name in ("weight", "bias"):
        assert (saved[f"classifier.{name}"] - getattr(fresh, name)).abs().max() > 1e-3, name
    results = info["results"]
    assert results["eval/accuracy_after"] > results["eval/accuracy_before"]
    assert results["eval/loss_after"] < results["eval/loss_before"]


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_an_uninterrupted_run(resume_check, accum: int) -> None:
    resume_check("adapter.dropout=0.1", f"trainer.grad_accum={accum}", "trainer.max_steps=6")


def test_resume_refuses_a_changed_config(cfg_factory, trained_run) -> None:
    with pytest.raises(PetunerError, match=r"adapter.r=2 differs from the 8 that .* trained with;"):
        run(cfg_factory("trainer.resume=true", "adapter.r=2", run_dir=trained_run))


def test_existing_checkpoints_are_not_overwritten_without_resume(cfg_factory, trained_run) -> None:
    before = sorted(p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file())
    with pytest.raises(PetunerError, match="already holds checkpoints"):
        run(cfg_factory(run_dir=trained_run))
    assert sorted(p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()) == before


def test_keep_checkpoints_prunes_oldest(cfg_factory, tmp_path) -> None:
    run(cfg_factory("trainer.save_every=1", "trainer.keep_checkpoints=2", "trainer.max_steps=4"))
    assert [c.name for c in checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000004"]
