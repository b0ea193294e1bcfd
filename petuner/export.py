"""Export a trained run: as a peft adapter folder, or merged into a full Hugging Face model.

peft format: ``adapter_config.json`` (written by peft's own ``LoraConfig``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.lora_A.weight`` etc.;
``peft.PeftModel.from_pretrained(base, DIR)`` loads it. Each layer gives its tensors through
``peft_lora`` (a variant's extras too, e.g. DoRA's magnitude); an adapter living in peft's own
layers (``adapter=peft``) is rebuilt as a ``PeftModel`` and saved by peft's ``save_pretrained``.
Merged: every adapter folded into its base weight, the wrappers removed, saved with
``save_pretrained`` alongside the tokenizer, loadable by the matching ``AutoModel`` class without
petuner. Both are written to a temporary folder first and renamed into place; an existing non-empty
destination needs ``force``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from petuner.adapters import LoRAFactors, adapter_layers, adapter_state_dict, unload
from petuner.choices import EXPORT_FORMATS, GGUF_DTYPES
from petuner.errors import PetunerError
from petuner.io import atomic_dir, atomic_file
from petuner.manifest import write_manifest
from petuner.models import load_model
from petuner.run_folder import LoadedRun, load

PEFT_PREFIX = "base_model.model."
log = logging.getLogger(__name__)


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PetunerError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PetunerError(f"--out {out} is not empty; pass --force to replace it")


def lora_factors(run: LoadedRun) -> dict[str, LoRAFactors]:
    """Every adapter layer as a plain LoRA; layers pruned to rank 0 (SoRA) drop out."""
    factors: dict[str, LoRAFactors] = {}
    for name, layer in adapter_layers(run.model):
        lora = layer.peft_lora()
        if lora is None:
            raise PetunerError(f"adapter={run.cfg.adapter.name} has no peft form (layer {name}); use --format merged")
        if lora.A.shape[0] > 0:
            factors[name] = lora
    if not factors:
        raise PetunerError("every adapter layer has rank 0 (all gates pruned): nothing to export as peft")
    return factors


def fit_ranks(config: Any, factors: dict[str, LoRAFactors]) -> None:
    """Set r / lora_alpha to the layers' actual ranks and scales; layers that differ go in peft's
    ``rank_pattern`` / ``alpha_pattern`` (a SoRA export's ranks differ per layer, a DyLoRA export's
    rank is the chosen truncation)."""
    def alpha(rank: int, scaling: float) -> float:
        return scaling * (math.sqrt(rank) if config.use_rslora else rank)

    pairs = {name: (f.A.shape[0], alpha(f.A.shape[0], f.scaling)) for name, f in factors.items()}
    config.r, config.lora_alpha = Counter(pairs.values()).most_common(1)[0][0]
    config.rank_pattern = {n: r for n, (r, _) in pairs.items() if r != config.r}
    config.alpha_pattern = {n: a for n, (_, a) in pairs.items() if a != config.lora_alpha}


def peft_state_dict(run: LoadedRun, factors: dict[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """peft LoRA tensors: the factors, plus biases and task heads that trained alongside."""
    state: dict[str, torch.Tensor] = {}
    for name, lora in factors.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora.A
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora.B
        state.update({f"{PEFT_PREFIX}{name}.{key}": tensor for key, tensor in lora.extra.items()})
    own = tuple(f"{name}." for name, _ in adapter_layers(run.model))
    for key, tensor in adapter_state_dict(run.model).items():
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
    if note := run.method.export_note(fmt):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def export_peft(run: LoadedRun, out: Path) -> None:
    """Write the peft adapter files into the (temporary) folder ``out``."""
    config = run.method.peft_config(run.info["targets"], run.cfg.model.task, run.info["head_modules"],
                                    run.info.get("base_model"))
    if config is None:
        raise PetunerError(f"adapter={run.cfg.adapter.name} has no peft form; use --format merged")
    native = run.method.to_peft_model(run.model, config, lambda: load_model(
        run.cfg.model, num_labels=len(run.info.get("label_names") or []) or None))
    if native is not None:  # the adapter is peft's own: peft writes its files
        native.save_pretrained(str(out))
        return
    factors = lora_factors(run)
    config.target_modules = list(factors)
    fit_ranks(config, factors)
    state = peft_state_dict(run, factors)
    config.save_pretrained(str(out))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "adapter_model.safetensors"))


def export_merged(run: LoadedRun, out: Path) -> None:
    """Write the merged model and tokenizer into the (temporary) folder ``out``."""
    if any(layer.quantized_base for _, layer in adapter_layers(run.model)):
        log.info("adapter=%s trained on a quantized base: the merged export holds the dequantized base weights "
                 "plus the adapter in full precision", run.cfg.adapter.name)
    model = unload(run.model, merge=True)
    if run.info.get("label_names"):
        model.config.id2label = dict(enumerate(run.info["label_names"]))
        model.config.label2id = {name: i for i, name in enumerate(run.info["label_names"])}
    model.save_pretrained(str(out))
    run.tokenizer.save_pretrained(str(out))


def export(run_dir: Path | str, fmt: str, out: Path | str, *, force: bool = False, rank: int | None = None,
           checkpoint: str | None = None, dtype: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write ``run_dir`` to ``out`` as ``fmt``; ``rank`` truncates a rank-dynamic adapter (DyLoRA),
    ``checkpoint`` (best, last, step-N) picks the weights, ``dtype`` the GGUF tensor type."""
    if fmt not in EXPORT_FORMATS:
        raise PetunerError(f"--format {fmt!r}: allowed: {', '.join(EXPORT_FORMATS)}")
    if dtype is not None and (fmt != "gguf" or dtype not in GGUF_DTYPES):
        raise PetunerError(f"--dtype {dtype}: only for --format gguf, one of {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    if fmt == "gguf":
        return _export_gguf(Path(run_dir), out, force=force, rank=rank, checkpoint=checkpoint,
                            dtype=dtype or "f16", trust_remote_code=trust_remote_code)
    _check_destination(out, force)
    run = load(run_dir, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    if rank is not None:
        run.method.set_rank(run.model, rank)
    with atomic_dir(out, replace=True) as tmp:  # a kill at any moment leaves no half-written export
        (export_peft if fmt == "peft" else export_merged)(run, tmp)
        (tmp / "README.md").write_text(model_card(run, fmt))
        write_manifest(tmp, {"kind": f"export-{fmt}", "model": OmegaConf.to_container(run.cfg.model),
                             "task": run.info["task"], "label_names": run.info.get("label_names") or [],
                             "rank": rank, "data_kind": run.info.get("data_kind"),
                             "system_prompt": run.cfg.data.get("system_prompt")})
    log.info("exported %s (%s) to %s", run_dir, fmt, out)
    return out


def _export_gguf(run_dir: Path, out: Path, *, force: bool, rank: int | None, checkpoint: str | None, dtype: str,
                 trust_remote_code: bool) -> Path:
    """The merged model and its tokenizer as one GGUF file, checked for a writable architecture first."""
    from petuner.gguf_export import check_gguf_model, write_gguf
    from petuner.models import model_config
    from petuner.run_folder import check_remote_code, read_config

    if out.is_dir() or (out.exists() and not force):
        raise PetunerError(f"--out {out} exists; pass --force to replace it" if not out.is_dir()
                           else f"--out {out} is a folder; --format gguf writes a file (e.g. model.gguf)")
    cfg = read_config(run_dir)
    check_remote_code(cfg.model, run_dir, trust_remote_code)  # before model_config could import its code
    check_gguf_model(model_config(cfg.model), cfg.model.task, str(run_dir))
    run = load(run_dir, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    if rank is not None:
        run.method.set_rank(run.model, rank)
    model = unload(run.model, merge=True)
    with atomic_file(out) as tmp:
        write_gguf(model, run.tokenizer, tmp, dtype, name=f"{run_dir.name} ({run.cfg.adapter.name}, petuner)")
    log.info("exported %s (gguf, %s) to %s", run_dir, dtype, out)
    return out
