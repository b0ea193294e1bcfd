"""petuner as users install it: a wheel in a fresh virtualenv, run from an empty folder that is not the repository.

The venv gets the wheel alone (``--no-deps``); the test environment's packages are visible to it through a
``.pth`` line (so nothing is downloaded), while its editable petuner is not: a path added by a ``.pth`` line is
not a site folder, so the editable install's own ``.pth`` finder never runs there.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
FAST = ("model=tiny_llama", "data=bbc_text", "data.limit=40", "data.eval_size=8", "data.max_length=64",
        "trainer.batch_size=4", "trainer.eval_every=null", "logger=none")


def sh(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": "", **env})


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from this repository; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("install")
    built = sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                "-w", str(tmp / "dist"), str(ROOT)], cwd=tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("petuner-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "petuner/conf/config.yaml" in names and "petuner/conf/model/tiny_llama.yaml" in names
    venv = tmp / "venv"
    assert sh([sys.executable, "-m", "venv", str(venv)], cwd=tmp).returncode == 0
    (purelib,) = venv.glob("lib/python3*/site-packages")
    (purelib / "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = sh([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
              cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


def test_the_wheel_trains_from_an_empty_folder_as_train_py_does(installed, tmp_path) -> None:
    where = sh([str(installed / "python"), "-c", "import petuner; print(petuner.__file__)"], cwd=tmp_path)
    assert str(installed.parent) in where.stdout, where.stdout + where.stderr  # the wheel's petuner, not the repo's
    petuner_cfg = sh([str(installed / "petuner"), "train", "--cfg", "job", *FAST], cwd=tmp_path)
    repo_cfg = sh([sys.executable, str(ROOT / "train.py"), "--cfg", "job", *FAST], cwd=tmp_path)
    assert petuner_cfg.returncode == 0, petuner_cfg.stderr[-3000:]
    assert petuner_cfg.stdout.splitlines() == repo_cfg.stdout.splitlines() and "hidden_size: 64" in petuner_cfg.stdout

    runs = {"petuner": tmp_path / "a", "train.py": tmp_path / "b"}
    trained = sh([str(installed / "petuner"), "train", *FAST, "trainer.max_steps=3", f"run_dir={runs['petuner']}"],
                 cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = sh([sys.executable, str(ROOT / "train.py"), *FAST, "trainer.max_steps=3", f"run_dir={runs['train.py']}"],
              cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(run / "adapter.safetensors") for run in runs.values())
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # trained: B moved off its zero init
    assert not (tmp_path / "conf").exists()  # nothing of the repository was needed


def test_init_writes_a_folder_that_trains_with_the_users_model(installed, tmp_path) -> None:
    done = sh([str(installed / "petuner"), "init", "myconf", "--model", "tiny_llama"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    listing = sh([str(installed / "petuner"), "ls", "--config-dir", "myconf"], cwd=tmp_path).stdout
    assert "my_model" in listing and "my_chats" in listing and "my_run" in listing and "lora" in listing
    model_yaml = tmp_path / "myconf" / "model" / "my_model.yaml"
    model_yaml.write_text(model_yaml.read_text().replace("init_seed: 0", "init_seed: 7"))  # the user edits it
    run_dir = tmp_path / "run"
    done = sh([str(installed / "petuner"), "train", "--config-dir", "myconf", "experiment=my_run",
               "trainer.max_steps=3", f"run_dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    assert "name: my_chats" in config and "init_seed: 7" in config  # the user's own model and data files
    again = sh([str(installed / "petuner"), "init", "myconf"], cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: myconf/")


@pytest.mark.parametrize("pins", [("transformers==5.22.2", "peft==0.20.0"), ("transformers==5.24.0",)],
                         ids=["previous-minor", "next-minor"])
def test_dependency_ranges_resolve_beside_neighbouring_releases(installed, tmp_path, pins) -> None:
    """pip resolves the wheel's ranges with the previous and the next minor releases (peft has no next minor
    yet: 0.21 is its newest). A dry run: nothing is installed."""
    (wheel,) = installed.parent.parent.glob("dist/petuner-*.whl")
    done = sh([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--no-build-isolation", str(wheel), *pins],
              cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
