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
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from petuner.config import CONF_DIR  # noqa: E402

# Small and fast: a tiny random Llama on 64 chatterbot pairs, a few steps.
TINY = ("model=tiny_llama", "logger=none", "data.limit=64", "data.eval_size=32", "data.max_length=64",
        "trainer.max_steps=6", "trainer.batch_size=4", "trainer.eval_batch_size=16", "trainer.save_every=3",
        "optimizer.warmup_steps=0", "optimizer.lr=1e-2")


def make_cfg(run_dir: Path | str, *overrides: str, base: Sequence[str] = TINY) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*base, f"run_dir={run_dir}", *overrides])


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str, run_dir: Path | None = None, base: Sequence[str] = TINY) -> DictConfig:
        return make_cfg(run_dir or tmp_path / "run", *overrides, base=base)

    return factory


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
