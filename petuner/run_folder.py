"""A run folder's layout, and loading a trained run back: ``petuner.load(RUN_DIR)``.

    RUN_DIR/config.yaml          the resolved config the run trained with
    RUN_DIR/run.json             what training decided: targets, heads, labels, base weights, results
    RUN_DIR/adapter.safetensors  the trained weights (adapter + trained heads; all weights for adapter=none)
    RUN_DIR/metrics.jsonl        one JSON object per logged step and evaluation
    RUN_DIR/checkpoints/         step-NNNNNNNN/ folders for resume
    RUN_DIR/best/                the best evaluation's weights (with trainer.eval_every set)

Folders are often someone else's: loading never runs a model's own code unless the caller passes
``trust_remote_code=True`` on that call, and never resolves ``${...}`` interpolations in a stored
config (a run saves its config resolved, so such a string can only be a literal or planted).
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


def _literal(value: Any) -> Any:
    """``value`` with every ``${`` escaped, so OmegaConf reads interpolations as plain text."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def literal_config(data: dict[str, Any]) -> DictConfig:
    """A stored config as written: no interpolation (``${oc.env:...}`` and the like) is ever resolved."""
    return OmegaConf.create(_literal(data))


def read_config(run_dir: Path | str) -> DictConfig:
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise PetunerError(f"{run_dir} is not a petuner run folder (no {CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:  # a YAML syntax error spans lines: its first is enough
        raise PetunerError(f"{path}: not a readable config ({first_line(err)})") from None
    if not isinstance(data, dict) or not all(g in data for g in ("model", "adapter")):
        raise PetunerError(f"{path}: not a petuner run config (a mapping with model and adapter sections)")
    return literal_config(data)


def check_remote_code(model_cfg: Any, where: Path | str, trust_remote_code: bool) -> None:
    """Refuse a folder that asks to run its model's own code unless the caller allowed it on this call."""
    if model_cfg.get("trust_remote_code") not in (False, None) and not trust_remote_code:
        raise PetunerError(f"{where} asks to run the model's own code (model.trust_remote_code: true, model "
                           f"{model_cfg.get('name_or_path')}); refused: pass trust_remote_code=True "
                           "(--trust-remote-code) only if you trust its author")


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
    from petuner.adapters.capabilities import ComposesRuns, QuantizedBase
    from petuner.models import load_model

    model = load_model(cfg.model, num_labels=len(info.get("label_names") or []) or None)
    method = build_adapter(cfg.adapter)
    if isinstance(method, (QuantizedBase, ComposesRuns)):
        method.restore(info.get("adapter_report") or {})
    injection = inject(model, method, info["head_modules"])
    if injection.targets != info["targets"]:
        raise PetunerError("the adapter's targets differ from the ones the run trained: the base model changed")
    return model, method


def checkpoint_weights(run_dir: Path, checkpoint: str) -> Path:
    """The weights file ``--checkpoint best|last|step-N`` names in ``run_dir``."""
    from petuner.manifest import verify_manifest
    from petuner.train.best import BEST_DIR
    from petuner.train.checkpoint import checkpoints

    if checkpoint == "last":
        return run_dir / ADAPTER_FILE
    if checkpoint == "best":
        if not (run_dir / BEST_DIR / ADAPTER_FILE).is_file():
            raise PetunerError(f"--checkpoint best: {run_dir} has no {BEST_DIR}/ (it is kept only by runs "
                               "trained with trainer.eval_every set)")
        verify_manifest(run_dir / BEST_DIR)
        return run_dir / BEST_DIR / ADAPTER_FILE
    saved = {int(p.name.split("-")[1]): p for p in checkpoints(run_dir)}
    step = checkpoint.removeprefix("step-")
    if not checkpoint.startswith("step-") or not step.isdigit() or int(step) not in saved:
        steps = ", ".join(f"step-{n}" for n in saved) or "none saved"
        raise PetunerError(f"--checkpoint {checkpoint!r}: allowed: best, last, or a saved step ({steps})")
    return saved[int(step)] / ADAPTER_FILE


def folder_task(path: Path | str) -> str:
    """The task (causal_lm, seq_cls) of a run folder or export, read without loading any weights."""
    from petuner.manifest import read_manifest

    manifest = read_manifest(Path(path))
    if manifest is not None and str(manifest.get("kind", "")).startswith("export-"):
        return str(manifest["task"])
    return str(read_config(path).model.task)


def folder_labels(path: Path | str) -> list[str]:
    """The class names a classification run or export learnt ([] for a language model)."""
    from petuner.manifest import read_manifest

    manifest = read_manifest(Path(path))
    if manifest is not None and str(manifest.get("kind", "")).startswith("export-"):
        return list(manifest.get("label_names") or [])
    return list(read_info(path).get("label_names") or [])


def load(run_dir: Path | str, *, weights: str | Path | None = None, checkpoint: str | None = None,
         trust_remote_code: bool = False, tokenizer: bool = True) -> LoadedRun:
    """The trained model (eval mode, CPU, adapter un-merged) and its tokenizer (None with ``tokenizer=False``:
    merging reads only weights).

    ``checkpoint`` (best, last, step-N) or ``weights`` (a file) picks other weights than the final ones.
    """
    from safetensors.torch import load_file

    from petuner.adapters import load_adapter_state_dict
    from petuner.models import load_tokenizer

    run_dir = Path(run_dir)
    verify_manifest(run_dir)
    cfg, info = read_config(run_dir), read_info(run_dir)
    check_remote_code(cfg.model, run_dir, trust_remote_code)
    if checkpoint is not None:
        weights = checkpoint_weights(run_dir, checkpoint)
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
    return LoadedRun(model=model, tokenizer=load_tokenizer(cfg.model) if tokenizer else None, cfg=cfg, info=info,
                     method=method)


def load_export(folder: Path, manifest: dict[str, Any], *, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A petuner export (already verified against its manifest), loaded as plain transformers / peft."""
    from transformers import AutoTokenizer

    from petuner.models import auto_model_class, load_model, load_tokenizer

    if manifest["kind"] == "export-quantized":  # a run folder's loadable part
        loaded = load(folder, trust_remote_code=trust_remote_code)
        return loaded.model, loaded.tokenizer
    model_cfg = literal_config(manifest["model"])
    check_remote_code(model_cfg, folder, trust_remote_code)
    if manifest["kind"] == "export-merged":
        allow = trust_remote_code  # the caller's permission; a request without it was refused above
        try:
            model = auto_model_class(manifest["task"]).from_pretrained(str(folder), trust_remote_code=allow)
        except ValueError as err:  # config.json maps to code in the folder that nobody allowed to run
            if "trust_remote_code" not in str(err):
                raise
            raise PetunerError(f"{folder} holds model code of its own; refused: pass trust_remote_code=True "
                               "(--trust-remote-code) only if you trust its author") from None
        return model.eval(), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=allow)
    from peft import PeftModel

    base = load_model(model_cfg, num_labels=len(manifest["label_names"]) or None)
    return PeftModel.from_pretrained(base, str(folder)).eval(), load_tokenizer(model_cfg)
