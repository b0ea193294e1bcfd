"""One typed schema per config group: the YAMLs keep values only, a key no schema has or a value of the wrong
type is one line, keys that contradict each other are refused, and a model brings its own optimizer defaults."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from petuner.adapters.block_lora import BlockLoRASchema
from petuner.adapters.dylora import DyLoRASchema
from petuner.adapters.lora import LoRABaseSchema, LoRACoreSchema, LoRASchema
from petuner.adapters.lq_lora import LQLoRASchema
from petuner.adapters.qlora import QLoRASchema
from petuner.adapters.sora import SoRASchema
from petuner.config import CONF_DIR, GROUPS, compose_config, group_schema, schemas, validate
from petuner.errors import ConfigError, PetunerError
from petuner.schema import conform
from petuner.train.logging import LoggerSchema

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("group", GROUPS)
def test_every_yaml_names_its_schema_and_sets_exactly_its_keys(group: str) -> None:
    if group == "logger":  # one schema for every mix of sinks: each YAML sets its own sink's entry in full
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            raw = OmegaConf.load(path)
            hints = typing.get_type_hints(LoggerSchema)
            for sink, entry in raw.items():
                sink_schema = next(a for a in typing.get_args(hints[str(sink)]) if a is not type(None))
                assert set(entry) == {f.name for f in dataclasses.fields(sink_schema)}, path
            cfg = compose_config(["model=tiny_llama", f"logger={path.stem}", "run_dir=."])
            conform(LoggerSchema, cfg.logger, "logger", path.stem)
        return
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        raw = OmegaConf.load(path)
        schema_name = raw.defaults[0]
        assert list(raw.defaults) == [schema_name, "_self_"], path
        schema = schemas()[group][schema_name]
        assert set(raw) - {"defaults"} == {f.name for f in dataclasses.fields(schema)}, path
        cfg = compose_config(["model=tiny_llama", f"{group}={path.stem}", "run_dir=."])
        conform(group_schema(cfg, group), cfg[group], group, path.stem)  # its values pass its own checks


def test_methods_that_share_options_inherit_them() -> None:
    for schema in (QLoRASchema, LQLoRASchema, BlockLoRASchema, LoRASchema):
        assert issubclass(schema, LoRABaseSchema)
    for schema in (DyLoRASchema, SoRASchema, LoRABaseSchema):
        assert issubclass(schema, LoRACoreSchema)
    assert {f.name for f in dataclasses.fields(QLoRASchema)} == {f.name for f in dataclasses.fields(LoRABaseSchema)}


WRONG = [
    # a key no schema has (Hydra refuses it while composing)
    (("adapter.rank=4",), r"^adapter.rank is not a config key; allowed: r, alpha, dropout"),
    (("trainer.max_stpes=5",), r"^trainer.max_stpes is not a config key; did you mean trainer.max_steps\? allowed: "),
    # ... or one added with + (the schema refuses it when the run is checked)
    (("+optimizer.momentum=0.9",), r"^optimizer.momentum is not an option of optimizer=adamw; allowed: lr, "),
    (("+model.revision=main",), r"^model.revision is not an option of the model schema; allowed: name_or_path, "),
    # a value of the wrong type, in every group: the field's own message, or its type
    (("adapter.alpha=abc",), r"^adapter.alpha='abc': must be a number > 0$"),
    (("adapter=dylora", "adapter.rank_weights=[a,b]"), r"^adapter.rank_weights\[0\]='a': wrong type"),
    (("model.init_seed=[1]",), r"^model.init_seed=\[1\]: must be an integer >= 0$"),
    (("data.max_length=long",), r"^data.max_length='long': must be an integer >= 2$"),
    (("optimizer.betas=0.9",), r"^optimizer.betas=0.9: must be two numbers in \[0, 1\)$"),
    (("trainer.resume=yes",), r"^trainer.resume='yes': must be true or false$"),
    (("trainer.seed=1.5",), r"^trainer.seed=1.5: must be an integer >= 0$"),
    (("logger.wandb.tags=5",), r"^logger.wandb.tags=5: wrong type"),
    # keys that contradict each other
    (("model=tiny_llama", "model.name_or_path=/no/such/model"),
     r"^model.name_or_path='/no/such/model' and model.random_init are both set"),
    (("trainer.epochs=2",), r"^trainer.epochs=2 and trainer.max_steps=120 are both set: set trainer.max_steps=null"),
    (("data=bbc_text", "data.system_prompt=Be brief."), r"^data.system_prompt is set but data.kind=text has no chat"),
    (("data=jsonl",), r"^data.path is not set: data=jsonl needs data.path="),
]


@pytest.mark.parametrize("overrides, message", WRONG, ids=[" ".join(o) for o, _ in WRONG])
def test_wrong_keys_types_and_contradictions_are_one_line(overrides, message) -> None:
    from petuner.config import check_command_line

    with pytest.raises(ConfigError, match=message) as err:
        check_command_line(overrides)  # what train.py runs first; validate() is the part composing cannot see
        validate(compose_config([*overrides, "run_dir=."]))
    assert "\n" not in str(err.value)


def test_model_config_brings_its_optimizer_defaults_and_the_command_line_wins() -> None:
    assert compose_config(["run_dir=."]).optimizer.lr == 2.0e-4
    minilm = compose_config(["model=minilm_l6", "data=bbc_news", "run_dir=."])
    assert minilm.optimizer.lr == 5.0e-3 and minilm.optimizer.head_lr is None
    assert compose_config(["model=minilm_l6", "optimizer.lr=1e-3", "run_dir=."]).optimizer.lr == 1.0e-3


def test_head_lr_gives_the_task_head_its_own_group() -> None:
    import torch

    from petuner.optim import build_optimizer

    model = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "classifier": torch.nn.Linear(4, 2)})
    cfg = OmegaConf.merge(compose_config(["run_dir=."]).optimizer, {"head_lr": 1e-2})
    optimizer = build_optimizer(model, cfg, torch.device("cpu"), heads=["classifier"])
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lrs[id(p)] for p in model["classifier"].parameters()} == {1e-2}
    assert {lrs[id(p)] for p in model["body"].parameters()} == {2e-4}


# --- one kind of user error: PetunerError, one line -------------------------------------------------

def test_a_chat_template_that_cannot_mask_the_answer_is_one_line() -> None:
    from petuner.data.sft import render

    class Tokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=False,
                                tools=None):
            return "<head>" if add_generation_prompt else "<other>" + messages[-1]["content"]

    with pytest.raises(PetunerError, match=r"^odd row 1: the chat template is not prefix-stable") as err:
        render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], Tokenizer(), "odd row 1")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, text, message", [
    ("config.yaml", "model: [unclosed\n", r"config.yaml: not a readable config \("),
    ("config.yaml", "- a list\n", r"config.yaml: not a petuner run config"),
    ("run.json", "{broken", r"run.json: not valid JSON \("),
    ("run.json", "[1, 2]", r"run.json: must hold a JSON object, got list"),
])
def test_a_damaged_run_folder_is_one_line(tmp_path, name: str, text: str, message: str) -> None:
    from petuner.run_folder import read_config, read_info

    (tmp_path / "config.yaml").write_text("model: {}\nadapter: {}\n")
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / name).write_text(text)
    with pytest.raises(PetunerError, match=message) as err:
        read_config(tmp_path) if name == "config.yaml" else read_info(tmp_path)
    assert "\n" not in str(err.value)


def test_petuner_cli_gives_a_user_error_one_line_and_status_2(tmp_path, capsys) -> None:
    from petuner.cli import main

    (tmp_path / "config.yaml").write_text("- not a run\n")
    assert main(["export", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path}/config.yaml: not a petuner run config (a mapping with model and adapter sections)"]


# --- quiet runs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bitsandbytes_4bit_kernel_warning_only_when_a_4bit_layer_is_built() -> None:
    script = ("import logging, sys, torch; logging.basicConfig(); import petuner, peft; "
              "print('IMPORTED', file=sys.stderr, flush=True); "
              "from petuner.adapters.qlora import nf4_linear; nf4_linear(torch.nn.Linear(64, 64))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr.split("IMPORTED")[0]  # stderr before the first 4-bit layer
    raw = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if "gemm_4bit_forward" in raw.stderr:  # this machine's bitsandbytes warns: the 4-bit layer says so
        assert done.stderr.count("gemm_4bit_forward") == 1


def test_quiet_logger_holds_only_the_4bit_kernel_message(caplog) -> None:
    from petuner.quiet import BNB_CPU_LOGGER, hold_4bit_kernel_warning

    hold_4bit_kernel_warning()
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logging.getLogger(BNB_CPU_LOGGER).warning("Failed to load CPU gemm_4bit_forward from kernels-community")
        logging.getLogger(BNB_CPU_LOGGER).warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
