"""``petuner init`` and ``petuner ls``: a user's own config folder, started from the shipped configs.

``init`` writes a folder that trains as written (``petuner train --config-dir DIR experiment=my_run``): a model
YAML copied from a shipped one (as torchtune's ``tune cp``), a data YAML over a small chat file it also writes,
and an experiment file that picks both. ``ls`` lists every group's choices, shipped and the user's.
"""

from __future__ import annotations

import json
from pathlib import Path

from petuner.config import CONF_DIR, config_groups, group_choices
from petuner.errors import PetunerError
from petuner.io import atomic_write_text

MODEL, DATA, EXPERIMENT = "my_model", "my_chats", "my_run"

DATA_YAML = """\
# Your data: one conversation per line of {data_file} ({{"messages": [{{role, content}}, ...]}}); the loss is on
# the assistant's turns. Any file the datasets library reads works (jsonl, json, csv, parquet), with
# `columns: {{messages: your_column}}` if your column has another name. `petuner data --config-dir {folder}
# data={name}` shows what training will see. The path is relative to where you run `petuner train`.
defaults:
  - chat                  # every key of the shipped data=chat, then these:
  - _self_
name: {name}
path: {data_file}
eval_size: 8
max_length: 128
"""

EXPERIMENT_YAML = """\
# @package _global_
# One run, written down: `petuner train --config-dir {folder} experiment={name}` (any override may follow, e.g.
# trainer.max_steps=10). Groups are picked with `override /GROUP: CHOICE` (yours in {folder}/GROUP/, or shipped:
# `petuner ls`); keys are set at their full path below.
defaults:
  - override /model: {model}
  - override /data: {data}
  - override /adapter: lora
  - override /logger: csv
adapter:
  r: 8
optimizer:
  lr: 2.0e-3
  warmup_steps: 2
trainer:
  max_steps: 30
  batch_size: 8
  eval_every: 10
"""


def sample_chats(n: int = 64) -> list[dict]:
    """A task a small model learns in a few dozen steps: the next number after a given one."""
    return [{"messages": [{"role": "user", "content": f"What number comes after {i}?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(n)]


def init(folder: Path, model: str = "smollm2_135m") -> list[Path]:
    """Write the starter folder; refuses to overwrite any file already there."""
    if model not in group_choices("model"):
        raise PetunerError(f"--model {model}: allowed: {', '.join(group_choices('model'))}")
    data_file = folder / f"{DATA}.jsonl"
    header = f"# Your model, copied from the shipped model={model}: point name_or_path at a hub id or a folder.\n"
    files = {
        folder / "model" / f"{MODEL}.yaml": header + (CONF_DIR / "model" / f"{model}.yaml").read_text(),
        folder / "data" / f"{DATA}.yaml": DATA_YAML.format(data_file=data_file, folder=folder, name=DATA),
        folder / "experiment" / f"{EXPERIMENT}.yaml": EXPERIMENT_YAML.format(folder=folder, name=EXPERIMENT,
                                                                              model=MODEL, data=DATA),
        data_file: "".join(json.dumps(row) + "\n" for row in sample_chats()),
    }
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise PetunerError(f"{existing[0]} exists; petuner init writes only new files (choose another folder)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return list(files)


def list_choices(config_dir: Path | None = None) -> str:
    """Each config group and its choices, the user's included (``--config-dir``)."""
    return "\n".join(f"{group:<15} {' '.join(group_choices(group, config_dir))}"
                     for group in sorted(config_groups(config_dir)))
