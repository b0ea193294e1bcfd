"""Exports reload without petuner and give petuner's logits; petuner.load restores a run."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import petuner
from petuner.errors import PetunerError
from petuner.export import export
from petuner.models import load_model
from petuner.run_folder import read_config

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def petuner_logits(run_dir):
    model, _ = petuner.load(run_dir)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_load_restores_the_trained_adapter(trained_run) -> None:
    model, tokenizer = petuner.load(trained_run)
    assert tokenizer.pad_token is not None
    base = load_model(read_config(trained_run).model).eval()
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - base(input_ids=IDS).logits).abs().max() > 1e-4


def test_peft_export_reloads_in_peft_with_the_same_logits(trained_run, tmp_path) -> None:
    out = export(trained_run, "peft", tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                     "adapter_model.safetensors", "petuner_manifest.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    base = load_model(read_config(trained_run).model)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        theirs = reloaded(input_ids=IDS).logits
    assert (theirs - petuner_logits(trained_run)).abs().max() <= 1e-5


def test_merged_export_loads_with_plain_transformers(trained_run, tmp_path) -> None:
    out = export(trained_run, "merged", tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        theirs = reloaded(input_ids=IDS).logits
    assert (theirs - petuner_logits(trained_run)).abs().max() <= 1e-4
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_classification_exports_carry_the_head(trained_cls_run, tmp_path, fmt: str) -> None:
    out = export(trained_cls_run, fmt, tmp_path / fmt)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model, _ = petuner.load(trained_cls_run)
    if fmt == "peft":
        base = load_model(read_config(trained_cls_run).model, num_labels=5)
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        tol = 1e-5
    else:
        reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert reloaded.config.id2label[3] == "sports"
        tol = 1e-4
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= tol


def test_export_refuses_a_non_empty_destination_without_force(trained_run, tmp_path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PetunerError, match="is not empty; pass --force"):
        export(trained_run, "peft", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(trained_run, "peft", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_full_finetune_has_no_peft_form(cfg_factory, tmp_path) -> None:
    from petuner.run import run

    run(cfg_factory("adapter=none", "trainer.max_steps=1"))
    with pytest.raises(PetunerError, match="has no peft form; use --format merged"):
        export(tmp_path / "run", "peft", tmp_path / "out")
    out = export(tmp_path / "run", "merged", tmp_path / "merged")
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_petuner_load_verifies_and_loads_an_export(trained_run, tmp_path, fmt: str) -> None:
    out = export(trained_run, fmt, tmp_path / fmt)
    model, tokenizer = petuner.load(out)
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - petuner_logits(trained_run)).abs().max() <= 1e-4
    assert tokenizer.pad_token is not None
    weights = out / ("adapter_model.safetensors" if fmt == "peft" else "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PetunerError, match=r"does not match its checksum in petuner_manifest\.json"):
        petuner.load(out)


def test_run_folder_weights_are_verified(trained_run, tmp_path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    data = bytearray((copy / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(PetunerError, match=r"adapter\.safetensors does not match its checksum"):
        petuner.load(copy)
