"""Hydra's own flags behave as in any Hydra application: train.py's command-line check lets them through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from petuner.config import read_command_line

ROOT = Path(__file__).resolve().parent.parent


def train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("argv, overrides", [
    (["--cfg", "job", "model=tiny_llama"], ["model=tiny_llama"]),
    (["-c", "hydra", "--resolve", "adapter.r=4"], ["adapter.r=4"]),
    (["--info", "defaults", "trainer.max_steps=3"], ["trainer.max_steps=3"]),
    (["--info"], []),
    (["--help"], []),
    (["-m", "adapter=lora,sora", "--config-name", "config"], ["adapter=lora,sora"]),
])
def test_command_line_overrides_skip_hydra_flags_and_their_values(argv, overrides) -> None:
    assert read_command_line(argv).overrides == overrides


@pytest.mark.slow
def test_cfg_job_prints_the_composed_job_config(tmp_path) -> None:
    done = train_py("--cfg", "job", "model=tiny_llama", "adapter.r=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["adapter"]["r"] == 4 and cfg["model"]["random_init"]["model_type"] == "llama"
    assert cfg["run_dir"] == "${hydra:runtime.output_dir}" and not (tmp_path / "adapters").exists()


@pytest.mark.slow
def test_cfg_job_resolve_resolves_interpolations(tmp_path) -> None:
    done = train_py("--cfg", "job", "--resolve", "model=tiny_llama", "model.lora_targets=[q_proj,k_proj]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["adapter"]["target_modules"] == ["q_proj", "k_proj"] and "${" not in done.stdout


@pytest.mark.slow
def test_cfg_hydra_prints_hydras_config(tmp_path) -> None:
    done = train_py("--cfg", "hydra", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["hydra"]["job"]["chdir"] is False and "sweep" in cfg["hydra"]


@pytest.mark.slow
def test_info_and_help(tmp_path) -> None:
    info = train_py("--info", "defaults", "model=tiny_llama", cwd=tmp_path)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "model/tiny_llama" in info.stdout and "adapter/lora_schema" in info.stdout
    helped = train_py("--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "== Configuration groups ==" in helped.stdout and "adapter: adalora" in helped.stdout


@pytest.mark.slow
def test_a_bad_override_next_to_a_flag_is_still_one_line(tmp_path) -> None:
    done = train_py("--cfg", "job", "adapter.rr=4", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: adapter.rr is not a config key; did you mean adapter.r? allowed: r, alpha, dropout, target_modules, "
        "scaling, bias, init, variant"]
