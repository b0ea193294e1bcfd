"""The web page's pieces in-process: the form comes from the schemas, a bad value is the command line's line and
starts nothing, the binding refuses an open port without a password, the store reader tells runs apart.
The page itself, in a real browser: tests/test_ui_browser.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web page needs the petuner[ui] extra (gradio)")

import gradio as gr

from petuner import config
from petuner.cli import main
from petuner.schema import number
from petuner.train.schema import TrainerSchema
from petuner.ui import app, form, launcher, store
from petuner.ui.compose import RunSpec
from petuner.ui.serve import check_binding, is_loopback

CHOICES = {"model": "tiny_llama", "data": "chatterbot", "adapter": "lora", "optimizer": "adamw",
           "trainer": "default", "logger": ["none"]}


@dataclass
class ProbedTrainer(TrainerSchema):
    probe_key: int = number(3, integer=True)  # a key only this test adds


def test_a_key_added_to_a_schema_appears_in_the_form(monkeypatch: pytest.MonkeyPatch) -> None:
    # Planted bug this failed on: help read from the YAML only (the schema's comment lost).
    original = config.schemas

    def with_probe() -> dict[str, dict[str, type]]:
        return {**original(), "trainer": {"trainer_schema": ProbedTrainer}}

    form._fields.cache_clear()
    with monkeypatch.context() as patch:
        patch.setattr(config, "schemas", with_probe)
        fields = {f.path: f for f in form.form_fields(CHOICES, None)}
        probe = fields["trainer.probe_key"]
        assert (probe.type, probe.default, probe.value, probe.help) == ("int", "3", "3", "a key only this test adds")
        with gr.Blocks():
            shown = form.widget(probe, "k")
        assert shown.label == "trainer.probe_key" and "default 3 · a key only this test adds" in shown.info
        spec = form.spec_from(CHOICES, 1, list(fields.values()), [f.value for f in fields.values()])
        assert spec.changed == {}  # an untouched form adds no override
        spec = form.spec_from(CHOICES, 1, [probe], ["0"])
        assert spec.overrides()[-1] == "trainer.probe_key=0"
    form._fields.cache_clear()
    assert "trainer.probe_key" not in {f.path for f in form.form_fields(CHOICES, None)}
    assert fields["trainer.batch_size"].help.startswith("examples per micro-batch")  # the YAML's comment
    assert fields["adapter.scaling"].allowed == ("standard", "rslora")


def test_a_bad_value_is_the_command_lines_line_beside_its_field_and_starts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Planted bug this failed on: _launch starting the process before the check (the start below raised).
    fields = form.form_fields(CHOICES, None)
    values = ["0" if f.path == "trainer.max_steps" else f.value for f in fields]
    monkeypatch.setattr(launcher, "start", lambda *a, **k: pytest.fail("a bad value started a run"))
    out = app._launch(CHOICES, fields, 1, tuple(values), tmp_path / "store", None)
    assert main(["data", *RunSpec(CHOICES, {"trainer.max_steps": "0"}).overrides()]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert out[0] == f"**{cli_line}**" and cli_line.startswith("error: trainer.max_steps=0")
    infos = dict(zip([f.path for f in fields], out[3:len(fields) + 3], strict=True))
    assert infos["trainer.max_steps"]["info"] == f"⚠ {cli_line}"
    assert not infos["trainer.batch_size"]["info"].startswith("⚠")
    assert not (tmp_path / "store").exists()


def test_an_open_address_needs_a_password(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Planted bug this failed on: is_loopback("0.0.0.0") true (0.0.0.0 is every address, not loopback).
    monkeypatch.setattr(app, "build_app", lambda *a: pytest.fail("served without a password"))
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --host 0.0.0.0 serves the page beyond this machine")
    assert main(["ui", "--host", "0.0.0.0", "--auth", "nopassword"]) == 2
    assert "must be USER:PASSWORD" in capsys.readouterr().err
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.4", "example.org")))
    check_binding("0.0.0.0", ("user", "secret"))  # with a password: allowed


def _ended_run(folder: Path, console: str) -> Path:
    """A run folder whose launched process has ended, having written ``console``."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder.mkdir(parents=True)
    (folder / launcher.CONSOLE_FILE).write_text(console)
    (folder / launcher.LAUNCH_FILE).write_text(json.dumps({"pid": int(done.stdout), "argv": [], "overrides": [],
                                                           "processes": 1, "started": 0}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # being written
    return folder


def test_the_store_tells_failed_aborted_and_finished_runs_apart(tmp_path: Path) -> None:
    # Planted bug this failed on: the error line taken as the console's last line (a tqdm bar, not the error).
    failed = _ended_run(tmp_path / "a", "train:  10%|#  | 1/10\rtrain:  20%|## | 2/10\r\n"
                                        "error: data.path=x: no such file\nthe last line, not the error\n")
    aborted = _ended_run(tmp_path / "b", "error: stopped by SIGTERM after step 2: checkpoint c kept; continue it\n")
    finished = _ended_run(tmp_path / "c", "done\n")
    (finished / "run.json").write_text(json.dumps({"results": {"eval/loss_after": 1.0}, "steps": 2}))
    states = {d.name: store.state(d) for d in (failed, aborted, finished)}
    assert (states["a"].status, states["a"].step) == ("failed", 1)
    assert states["a"].error == "error: data.path=x: no such file"
    assert states["b"].status == "aborted" and states["b"].error.startswith("error: stopped by SIGTERM")
    assert (states["c"].status, states["c"].error) == ("finished", "")
    assert store.log_tail(failed).splitlines()[0] == "train:  20%|## | 2/10"  # a progress bar: its latest state
    assert {d.name for d in store.run_dirs(tmp_path)} == {"a", "b", "c"}
