"""Every shipped config runs from the command line: each YAML in conf/data/, conf/adapter/, conf/optimizer/ and
conf/loss/ is composed through ``train.py`` and trains one step end to end on a tiny model.

All of them run in ONE real process, a Hydra multirun (basic launcher, jobs in sequence): the test writes one
``case`` config per shipped YAML into a ``--config-dir`` (the experiment pattern: ``# @package _global_``, a
defaults override selecting the YAML, plus the file or values it needs) and sweeps ``+case=...`` over them.
The YAMLs are found by globbing, so a file added later is tried too; ``NEEDS`` lists only what some files need
beyond the shipped values (a data file, a classification model, an adapter for full fine-tuning).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from petuner.io import ADAPTER_FILE, RUN_FILE
from petuner.sweep import STATUS_FILE

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("data", "adapter", "optimizer", "loss")
# Small enough that a job is about composition and plumbing; one optimizer step, evaluated before and after.
COMMON = ("logger=none", "data.limit=8", "data.eval_size=4", "data.max_length=64", "trainer.max_steps=1",
          "trainer.batch_size=2", "trainer.eval_batch_size=4", "trainer.save_every=null", "optimizer.warmup_steps=0")
CHATS = [{"messages": [{"role": "user", "content": f"ping {i}"}, {"role": "assistant", "content": f"pong {i}"}]}
         for i in range(16)]
PAIRS = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."} for i in range(16)]
PREFERENCES = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}
               for i in range(16)]
ON_PREFERENCES = ({"data": "hf"}, {"data": {"path": "{tmp}/preferences.jsonl"}})
# "<group>/<file stem>" -> (other groups this case selects, values it sets). "{tmp}" is the test's folder.
NEEDS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "data/chat": ({}, {"data": {"path": "{tmp}/chats.jsonl"}}),
    "data/hf": ({}, {"data": {"path": "{tmp}/pairs.jsonl"}}),
    "data/jsonl": ({}, {"data": {"path": "{tmp}/pairs.jsonl"}}),
    "data/bbc_news": ({"model": "tiny_bert"}, {}),  # classification: a sequence-classification model
    "adapter/lq_lora": ({}, {"adapter": {"iterations": 2}}),  # fewer SVD <-> quantize rounds, same code
    "optimizer/galore": ({"adapter": "none"}, {"optimizer": {"rank": 8}}),  # GaLore is full fine-tuning;
    "optimizer/galore8bit": ({"adapter": "none"}, {"optimizer": {"rank": 8}}),  # rank 128 projects no tiny matrix
    "adapter/atlas": ({}, {"adapter": {"lora_r": 4}}),  # its LoRA alone: composing needs earlier runs (test_atlas)
    **{f"loss/{name}": ON_PREFERENCES for name in ("dpo", "simpo", "orpo", "kto")},  # kto: pairs made unpaired
    "loss/reward": ({**ON_PREFERENCES[0], "model": "tiny_bert"}, ON_PREFERENCES[1]),  # a one-output classifier
}


def shipped_yamls() -> list[str]:
    return [f"{group}/{path.stem}" for group in GROUPS for path in sorted((ROOT / "conf" / group).glob("*.yaml"))]


def write_case(folder: Path, name: str, tmp: Path) -> str:
    group, option = name.split("/")
    selects, values = NEEDS.get(name, ({}, {}))
    choices = {"model": "tiny_llama", **selects, group: option}
    body = "# @package _global_\n" + yaml.safe_dump(
        {"defaults": [{f"override /{g}": o} for g, o in choices.items()], **values}, sort_keys=False)
    case = name.replace("/", "_")
    (folder / f"{case}.yaml").write_text(body.replace("{tmp}", str(tmp)))
    return case


def write_files(tmp: Path) -> None:
    for file, rows in (("chats.jsonl", CHATS), ("pairs.jsonl", PAIRS), ("preferences.jsonl", PREFERENCES)):
        (tmp / file).write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.slow
def test_every_shipped_yaml_trains_one_step_through_train_py(tmp_path: Path) -> None:
    names = shipped_yamls()
    assert {"data/chat", "data/mixture", "adapter/lora", "optimizer/adamw"} <= set(names)
    assert set(NEEDS) <= set(names), "NEEDS names a YAML that is no longer shipped"
    write_files(tmp_path)
    (tmp_path / "case").mkdir()
    cases = {write_case(tmp_path / "case", name, tmp_path): name for name in names}
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PETUNER_DATA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config-dir", str(tmp_path), "-m",
                           f"+case={','.join(cases)}", *COMMON, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    failed, seen = {}, set()
    for job in sweep_dir.iterdir():
        if not (job / STATUS_FILE).is_file():
            continue
        (override,) = [o for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
                       if o.startswith("+case=")]
        name = cases[override.removeprefix("+case=")]
        seen.add(name)
        status = json.loads((job / STATUS_FILE).read_text())
        if status["status"] != "ok":
            failed[name] = status["error"]
            continue
        info = json.loads((job / RUN_FILE).read_text())
        group, option = name.split("/")
        chosen = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
        assert chosen[group] == option, name  # the case really composed the shipped YAML
        assert info["steps"] == 1 and math.isfinite(info["results"]["eval/loss_after"]), name
        assert (job / ADAPTER_FILE).stat().st_size > 0, name
    assert not failed, failed
    assert seen == set(names)
