"""A run folder's layout, and loading a trained run back: ``petuner.load(RUN_DIR)``.

    RUN_DIR/config.yaml          the resolved config the run trained with
    RUN_DIR/run.json             what training decided: targets, heads, labels, base weights, results
    RUN_DIR/adapter.safetensors  the trained weights (adapter + trained heads; all weights for adapter=none)
    RUN_DIR/metrics.jsonl        one JSON object per logged step and evaluation
    RUN_DIR/checkpoints/         step-NNNNNNNN/ folders for resume
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from petuner.errors import PetunerError, first_line
from petuner.io import ADAPTER_FILE, CONFIG_FILE, RUN_FILE
from petuner.manifest import verify_manifest


@dataclass
class LoadedRun:
    model: nn.Module
    tokenizer: Any
    cfg: DictConfig
    info: dict[str, Any]
    method: Any  # the run's AdapterMethod


def read_config(run_dir: Path | str) -> DictConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise PetunerError(f"{run_dir} is not a petuner run folder (no {CONFIG_FILE})")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error spans lines: its first is enough
        raise PetunerError(f"{path}: not a readable config ({first_line(err)})") from None
    if not isinstance(cfg, DictConfig) or not all(g in cfg for g in ("model", "adapter")):
        raise PetunerError(f"{path}: not a petuner run config (a mapping with model and adapter sections)")
    return cfg


def read_info(run_dir: Path | str) -> dict[str, Any]:
    import json

    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise PetunerError(f"{run_dir} has no {RUN_FILE}: the run never got past set-up")
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise PetunerError(f"{path}: not valid JSON ({first_line(err)})") from None
    if not isinstance(info, dict):
        raise PetunerError(f"{path}: must hold a JSON object, got {type(info).__name__}")
    return info


def build_base_with_adapter(cfg: DictConfig, info: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The run's base model (on CPU) with its adapter injected, weights as initialised."""
    from petuner.adapters import build_adapter, inject
    from petuner.adapters.capabilities import QuantizedBase
    from petuner.models import load_model

    model = load_model(cfg.model, num_labels=len(info.get("label_names") or []) or None)
    method = build_adapter(cfg.adapter)
    if isinstance(method, QuantizedBase):
        method.restore(info.get("adapter_report") or {})
    injection = inject(model, method, info["head_modules"])
    if injection.targets != info["targets"]:
        raise PetunerError("the adapter's targets differ from the ones the run trained: the base model changed")
    return model, method


def load(run_dir: Path | str, *, weights: str | Path | None = None) -> LoadedRun:
    """The trained model (eval mode, CPU, adapter un-merged) and its tokenizer."""
    from safetensors.torch import load_file

    from petuner.adapters import load_adapter_state_dict
    from petuner.models import load_tokenizer

    run_dir = Path(run_dir)
    verify_manifest(run_dir)
    cfg, info = read_config(run_dir), read_info(run_dir)
    weights = Path(weights) if weights else run_dir / ADAPTER_FILE
    if not weights.is_file():
        raise PetunerError(f"{weights} does not exist: the run has not finished (see {run_dir}/checkpoints)")
    model, method = build_base_with_adapter(cfg, info)
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise PetunerError(f"{weights}: not a readable safetensors file ({err})") from None
    load_adapter_state_dict(model, state)
    model.eval()
    return LoadedRun(model=model, tokenizer=load_tokenizer(cfg.model), cfg=cfg, info=info, method=method)


def load_export(folder: Path, manifest: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A petuner export (already verified against its manifest), loaded as plain transformers / peft."""
    from transformers import AutoTokenizer

    from petuner.models import auto_model_class, load_model, load_tokenizer

    if manifest["kind"] == "export-quantized":  # a run folder's loadable part
        loaded = load(folder)
        return loaded.model, loaded.tokenizer
    model_cfg = OmegaConf.create(manifest["model"])
    if manifest["kind"] == "export-merged":
        model = auto_model_class(manifest["task"]).from_pretrained(str(folder))
        return model.eval(), AutoTokenizer.from_pretrained(str(folder))
    from peft import PeftModel

    base = load_model(model_cfg, num_labels=len(manifest["label_names"]) or None)
    return PeftModel.from_pretrained(base, str(folder)).eval(), load_tokenizer(model_cfg)
