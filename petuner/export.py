"""Export a trained run: as a peft adapter folder, or merged into a full Hugging Face model.

peft format: ``adapter_config.json`` (written by peft's own ``LoraConfig``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.lora_A.weight`` etc.;
``peft.PeftModel.from_pretrained(base, DIR)`` loads it. Merged: every adapter folded into its base
weight, the wrappers removed, saved with ``save_pretrained`` alongside the tokenizer, loadable by
the matching ``AutoModel`` class without petuner. Both are written to a temporary folder first and
renamed into place; an existing non-empty destination needs ``force``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from petuner.adapters import adapter_layers, adapter_state_dict, build_adapter, unload
from petuner.errors import PetunerError
from petuner.io import atomic_dir
from petuner.run_folder import LoadedRun, load

FORMATS = ("peft", "merged")
PEFT_PREFIX = "base_model.model."
log = logging.getLogger(__name__)


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PetunerError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PetunerError(f"--out {out} is not empty; pass --force to replace it")


def peft_state_dict(run: LoadedRun) -> dict[str, torch.Tensor]:
    """The run's adapter as peft LoRA tensors; raises if some layer has no plain-LoRA form."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(run.model):
        factors = layer.as_lora()
        if factors is None:
            raise PetunerError(f"adapter={run.cfg.adapter.name} has no peft form (layer {name}); "
                               "use --format merged")
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = factors.A
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = factors.B
    own = tuple(f"{name}." for name, _ in adapter_layers(run.model))
    for key, tensor in adapter_state_dict(run.model).items():
        # Besides the factors: biases and task heads that trained alongside, under peft's own names.
        if not key.startswith(own) or ".base_layer." in key:
            state[PEFT_PREFIX + key] = tensor
    return state


def model_card(run: LoadedRun, fmt: str) -> str:
    """A README saying where the export came from and how to load it."""
    base = run.info.get("base_model") or f"a random init of model config {run.cfg.model.random_init}"
    results = run.info.get("results", {})
    lines = [f"# {run.cfg.adapter.name} adapter exported by petuner ({fmt})", "",
             f"- base model: `{base}`", f"- task: {run.info['task']}, data: {run.cfg.data.name}",
             f"- trained from run folder: `{run.info.get('run_dir')}`",
             *(f"- {k}: {v:.4g}" for k, v in results.items() if k.startswith("eval/")), ""]
    if fmt == "peft":
        lines += ["```python", "from peft import PeftModel",
                  "model = PeftModel.from_pretrained(base_model, \"<this folder>\")", "```"]
    else:
        lines += ["The adapter is merged into the weights: load this folder with the matching transformers",
                  "Auto class (e.g. `AutoModelForCausalLM.from_pretrained(\"<this folder>\")`)."]
    return "\n".join(lines) + "\n"


def export_peft(run: LoadedRun, out: Path) -> None:
    method = build_adapter(run.cfg.adapter)
    config = method.peft_config(run.info["targets"], run.cfg.model.task, run.info["head_modules"],
                                run.info.get("base_model"))
    if config is None:
        raise PetunerError(f"adapter={run.cfg.adapter.name} has no peft form; use --format merged")
    state = peft_state_dict(run)
    with atomic_dir(out, replace=True) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"))
        (tmp / "README.md").write_text(model_card(run, "peft"))


def export_merged(run: LoadedRun, out: Path) -> None:
    model = unload(run.model, merge=True)
    if run.info.get("label_names"):
        model.config.id2label = dict(enumerate(run.info["label_names"]))
        model.config.label2id = {name: i for i, name in enumerate(run.info["label_names"])}
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(str(tmp))
        run.tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(run, "merged"))


def export(run_dir: Path | str, fmt: str, out: Path | str, *, force: bool = False) -> Path:
    if fmt not in FORMATS:
        raise PetunerError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    out = Path(out)
    _check_destination(out, force)
    run = load(run_dir)
    if fmt == "peft":
        export_peft(run, out)
    else:
        export_merged(run, out)
    log.info("exported %s (%s) to %s", run_dir, fmt, out)
    return out
