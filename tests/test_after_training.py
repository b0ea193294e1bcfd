"""After training, through the ``petuner`` command in-process: eval on other data, refusing untrusted folders,
and bad input as one line with exit status 2 that writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import petuner
from petuner.cli import main
from petuner.errors import PetunerError
from petuner.evaluate import evaluate_run
from petuner.manifest import write_manifest
from petuner.run_folder import read_config

DATA = ("data=chatterbot", "data.limit=64", "data.eval_size=32", "data.max_length=64")  # as tests.conftest.TINY


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def one_line_exit_2(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_eval_on_the_training_data_reproduces_the_final_evaluation(trained_run, tmp_path, capsys) -> None:
    run_dir = copy_run(trained_run, tmp_path / "run")
    assert main(["eval", str(run_dir), *DATA]) == 0
    report = json.loads((run_dir / "eval-chatterbot.json").read_text())
    results = json.loads((run_dir / "run.json").read_text())["results"]
    assert report["eval/loss"] == pytest.approx(results["eval/loss_after"], abs=1e-6)
    assert report["eval/perplexity"] == pytest.approx(results["eval/perplexity_after"], rel=1e-5)
    assert report["examples"] == 32 and "eval/loss=" in capsys.readouterr().out


def test_eval_on_a_user_file_names_the_report_after_it(trained_run, tmp_path) -> None:
    run_dir = copy_run(trained_run, tmp_path / "run")
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) + "\n"
                            for i in range(10)))
    out, report = evaluate_run(run_dir, ["data=jsonl", f"data.path={data}", "data.eval_size=4"], split="all")
    assert out == run_dir / "eval-faq-all.json" and report["examples"] == 10 and report["eval/loss"] > 0


def write_custom_code_model(folder: Path, marker: Path) -> None:
    """A tiny Llama whose config and model classes are the folder's own Python: importing it writes ``marker``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from petuner.config import compose_config

    fields = dict(compose_config(["model=tiny_llama", "run_dir=."]).model.random_init)
    fields.pop("model_type")
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="marker_llama", architectures=["MarkerForCausalLM"],
                  auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_marker.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import LlamaConfig\n\n\nclass MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n")
    (folder / "modeling_marker.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_marker import MarkerConfig\n\n\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")


@pytest.fixture
def untrusted_run(trained_run, tmp_path) -> tuple[Path, Path]:
    """Someone else's run folder: its config.yaml asks for remote code of a local custom-code model (with a
    manifest that matches, as its author would write it)."""
    marker = tmp_path / "MARKER"
    write_custom_code_model(tmp_path / "custom_model", marker)
    run_dir = copy_run(trained_run, tmp_path / "theirs")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"].update(name_or_path=str(tmp_path / "custom_model"), random_init=None, trust_remote_code=True)
    cfg["adapter"]["target_modules"] = ["q_proj", "v_proj"]  # its model_type is in no family table: no auto targets
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_manifest(run_dir, {"kind": "run"}, files=["adapter.safetensors", "config.yaml"])
    return run_dir, marker


def test_untrusted_folder_is_refused_everywhere_and_its_code_never_runs(untrusted_run, tmp_path, capsys) -> None:
    run_dir, marker = untrusted_run
    with pytest.raises(PetunerError, match="asks to run the model's own code"):
        petuner.load(run_dir)
    before = snapshot(run_dir)
    commands = [["generate", str(run_dir), "--prompt", "hi"], ["chat", str(run_dir)], ["eval", str(run_dir), *DATA],
                ["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "p")],
                ["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")],
                ["export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]]
    for argv in commands:
        assert "refused: pass trust_remote_code=True (--trust-remote-code)" in one_line_exit_2(capsys, argv)
    assert not marker.exists()
    assert snapshot(run_dir) == before and not any((tmp_path / n).exists() for n in ("p", "m", "g.gguf"))

    model, _ = petuner.load(run_dir, trust_remote_code=True)  # the caller's explicit permission
    assert type(model).__name__ == "MarkerForCausalLM" and marker.read_text() == "custom code ran"


def test_stored_config_interpolations_are_never_resolved(trained_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PETUNER_TEST_SECRET", "s3cret")
    run_dir = copy_run(trained_run, tmp_path / "theirs")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["data"]["system_prompt"] = "${oc.env:PETUNER_TEST_SECRET}"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert read_config(run_dir).data.system_prompt == "${oc.env:PETUNER_TEST_SECRET}"


def test_chat_on_a_classification_run_is_one_line(trained_cls_run, capsys) -> None:
    assert one_line_exit_2(capsys, ["chat", str(trained_cls_run)]) == (
        f"error: {trained_cls_run} is a seq_cls model (it classifies, it does not write text): generate and chat "
        "need a causal_lm run")


def test_bad_input_is_one_line_and_writes_nothing(trained_run, trained_cls_run, tmp_path, capsys) -> None:
    run_dir = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run_dir)
    cases = {
        "missing data file": (["eval", str(run_dir), "data=jsonl", f"data.path={tmp_path / 'nope.jsonl'}"],
                              f"data.path='{tmp_path / 'nope.jsonl'}': {tmp_path / 'nope.jsonl'} does not exist"),
        "best without evaluations": (["export", str(run_dir), "--checkpoint", "best", "--out", str(tmp_path / "o")],
                                     "--checkpoint best: " + str(run_dir) + " has no best/"),
        "unsaved step": (["generate", str(run_dir), "--prompt", "hi", "--checkpoint", "step-99"],
                         "--checkpoint 'step-99': allowed: best, last, or a saved step (step-3, step-6)"),
        "gguf of an encoder": (["export", str(trained_cls_run), "--format", "gguf", "--out", str(tmp_path / "o.gguf")],
                               "--format gguf writes causal language models of the families llama, mistral, qwen2"),
        "wrong task for the model": (["eval", str(run_dir), "data=bbc_news"],
                                     "data=bbc_news is classification data, for a seq_cls model"),
        "dtype without gguf": (["export", str(run_dir), "--dtype", "q8_0", "--out", str(tmp_path / "o")],
                               "--dtype q8_0: only for --format gguf"),
        "prompt and file": (["generate", str(run_dir), "--prompt", "hi", "--file", "x.jsonl"],
                            "give either --prompt TEXT or --file prompts.jsonl"),
        "not a data override": (["eval", str(run_dir), "trainer.batch_size=2"],
                                "petuner eval takes data=... and data.*=... overrides only"),
        "negative temperature": (["generate", str(run_dir), "--prompt", "hi", "--temperature", "-1"],
                                 "--temperature -1.0: must be >= 0"),
        "top-p while greedy": (["generate", str(run_dir), "--prompt", "hi", "--top-p", "0.9"],
                               "--top-p and --seed shape sampling: set --temperature > 0"),
    }
    for name, (argv, message) in cases.items():
        assert message in one_line_exit_2(capsys, argv), name
    assert snapshot(run_dir) == before
    assert not any((tmp_path / n).exists() for n in ("o", "o.gguf"))


def test_merged_export_with_its_own_code_is_refused_without_the_flag(tmp_path) -> None:
    from petuner.models import load_tokenizer
    from petuner.run_folder import literal_config

    marker, folder = tmp_path / "MARKER", tmp_path / "export"
    write_custom_code_model(folder, marker)
    load_tokenizer(literal_config({"tokenizer": "asset:smollm2-tokenizer", "trust_remote_code": False})) \
        .save_pretrained(folder)
    write_manifest(folder, {"kind": "export-merged", "task": "causal_lm", "label_names": [],
                            "model": {"name_or_path": "theirs", "trust_remote_code": False}})
    with pytest.raises(PetunerError, match="holds model code of its own; refused"):
        petuner.load(folder)
    assert not marker.exists()
    model, _ = petuner.load(folder, trust_remote_code=True)
    assert type(model).__name__ == "MarkerForCausalLM" and marker.exists()
