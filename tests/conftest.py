"""Shared fixtures: composed configs for tiny models, and one trained tiny run reused by export tests."""

from __future__ import annotations

import os

for key, value in {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from petuner.config import compose_config  # noqa: E402

# Small and fast: a tiny random Llama on 64 chatterbot pairs, a few steps.
TINY = ("model=tiny_llama", "logger=none", "data.limit=64", "data.eval_size=32", "data.max_length=64",
        "trainer.max_steps=6", "trainer.batch_size=4", "trainer.eval_batch_size=16", "trainer.save_every=3",
        "optimizer.warmup_steps=0", "optimizer.lr=1e-2")


def make_cfg(run_dir: Path | str, *overrides: str, base: Sequence[str] = TINY) -> DictConfig:
    return compose_config([*base, f"run_dir={run_dir}", *overrides])


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str, run_dir: Path | None = None, base: Sequence[str] = TINY) -> DictConfig:
        return make_cfg(run_dir or tmp_path / "run", *overrides, base=base)

    return factory


class Crash(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def crash_after_first_checkpoint(patch: pytest.MonkeyPatch) -> None:
    """Make the loop raise ``Crash`` right after it writes its first checkpoint (patched through ``patch``)."""
    from petuner.train import loop as loop_module

    original = loop_module.save_checkpoint

    def crash_after_first(run_dir, step, *args, **kwargs):
        original(run_dir, step, *args, **kwargs)
        raise Crash(step)

    patch.setattr(loop_module, "save_checkpoint", crash_after_first)


@pytest.fixture
def resume_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[Path, Path]]:
    """Train ``overrides`` twice — straight through, and crashing right after the first checkpoint then
    resuming — and require bit-identical weights and losses. Returns both run folders."""
    from safetensors.torch import load_file

    from petuner.run import run
    from petuner.train.checkpoint import checkpoints
    from petuner.train.logging import read_metrics

    def check(*overrides: str, first_checkpoint: str = "step-00000003") -> tuple[Path, Path]:
        straight, resumed = tmp_path / "straight", tmp_path / "resumed"
        run(make_cfg(straight, *overrides))
        with monkeypatch.context() as patch:
            crash_after_first_checkpoint(patch)
            with pytest.raises(Crash):
                run(make_cfg(resumed, *overrides))
        assert [c.name for c in checkpoints(resumed)] == [first_checkpoint]
        run(make_cfg(resumed, *overrides, "trainer.resume=true"))
        a, b = load_file(straight / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        losses = [[m["train/loss"] for m in read_metrics(d) if "train/loss" in m] for d in (straight, resumed)]
        assert losses[0] == losses[1]
        return straight, resumed

    return check


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny LoRA run (non-zero B), shared by the export and load tests."""
    from petuner.run import run

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(make_cfg(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def trained_cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny BERT classification run (LoRA + trained head) on BBC News."""
    from petuner.run import run

    run_dir = tmp_path_factory.mktemp("trained_cls") / "run"
    run(make_cfg(run_dir, "model=tiny_bert", "data=bbc_news", "data.eval_size=16", "adapter.bias=lora_only"))
    return run_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def varied_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny LoRA run whose base has large random weights: its greedy generations vary by prompt and
    position (the default tiny init gives near-flat logits, hence one repeated token), so comparisons bite."""
    from petuner.run import run

    run_dir = tmp_path_factory.mktemp("varied") / "run"
    run(make_cfg(run_dir, "+model.random_init.initializer_range=0.2"))
    return run_dir
