"""Export a trained run: as a peft adapter folder, or merged into a full Hugging Face model.

peft format: ``adapter_config.json`` (written by peft's own ``LoraConfig``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.lora_A.weight`` etc.;
``peft.PeftModel.from_pretrained(base, DIR)`` loads it. Each layer gives its tensors through its
``lora_view`` (a variant's extras too, e.g. DoRA's magnitude) and the config is fitted to them
(``petuner.adapters.peft_form``); an adapter living in peft's own layers (``PeftNative``) is rebuilt
as a ``PeftModel`` and saved by peft's ``save_pretrained``.
Merged: every adapter folded into its base weight, the wrappers removed, saved with
``save_pretrained`` alongside the tokenizer, loadable by the matching ``AutoModel`` class without
petuner. Quantized (adapters over a quantized base: qlora, lq_lora): the run's config, its report and
its adapter state — for LQ-LoRA the packed mixed-precision base Q with it — which ``petuner.load``
rebuilds without recomputing anything (the merged export would dequantize the base to full precision).
All are written to a temporary folder first and renamed into place; an existing non-empty
destination needs ``force``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from petuner.adapters import LoRAFactors, adapter_state_dict, build_adapter, unload
from petuner.adapters.capabilities import PeftNative, QuantizedBase, RankDynamic
from petuner.adapters.peft_form import layout_options, lora_config, lora_state_dict, lora_views
from petuner.as_lora import Conversion, check_lora_form, check_request, to_lora
from petuner.choices import EXPORT_FORMATS, GGUF_DTYPES
from petuner.errors import PetunerError
from petuner.extras import require
from petuner.io import ADAPTER_FILE, CONFIG_FILE, RUN_FILE, atomic_dir, atomic_file, save_tensors
from petuner.manifest import write_manifest
from petuner.models import load_model
from petuner.run_folder import LoadedRun, load, read_config

log = logging.getLogger(__name__)
AS_LORA_REPORT = "as_lora.json"  # --as-lora: the rank, scale and relative error per matrix and overall


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PetunerError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PetunerError(f"--out {out} is not empty; pass --force to replace it")


def lora_factors(run: LoadedRun) -> dict[str, LoRAFactors]:
    """Every adapter layer's LoRA view; layers pruned to rank 0 (SoRA) drop out."""
    views = lora_views(run.model)
    if run.method.peft_options() is None or any(view is None for view in views.values()):
        raise PetunerError(f"adapter={run.cfg.adapter.name} has no peft form; use --format merged")
    factors = {name: view for name, view in views.items() if view is not None and view.A.shape[0] > 0}
    if not factors:
        raise PetunerError("every adapter layer has rank 0 (all gates pruned): nothing to export as peft")
    return factors


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
    elif fmt == "quantized":
        lines += ["The quantized base and the adapter, as petuner trained them: `petuner.load(\"<this folder>\")`",
                  "rebuilds the model from these files alone (no data, no recomputation)."]
    else:
        lines += ["The adapter is merged into the weights: load this folder with the matching transformers",
                  "Auto class (e.g. `AutoModelForCausalLM.from_pretrained(\"<this folder>\")`)."]
    if isinstance(run.method, QuantizedBase):
        lines += ["", run.method.export_note(fmt)]
    return "\n".join(lines) + "\n"


def export_peft(run: LoadedRun, out: Path, conversion: Conversion | None = None) -> None:
    """Write the peft adapter files into the (temporary) folder ``out``; with ``conversion`` (``--as-lora``)
    its plain LoRA factors and their report (``as_lora.json``)."""
    task, heads, base = run.cfg.model.task, run.info["head_modules"], run.info.get("base_model")
    if conversion is not None:
        bias = (run.method.peft_options() or {}).get("bias", "none")
        config = lora_config(conversion.factors, {"bias": bias, **layout_options(run.model)}, task, heads, base)
        config.save_pretrained(str(out))
        save_tensors(lora_state_dict(run.model, conversion.factors), out / "adapter_model.safetensors")
        (out / AS_LORA_REPORT).write_text(json.dumps(conversion.report, indent=2) + "\n")
        return
    if isinstance(run.method, PeftNative):  # the adapter is peft's own: peft writes its files
        run.method.peft_model(run.model, task, heads, base, lambda: load_model(
            run.cfg.model, num_labels=len(run.info.get("label_names") or []) or None)).save_pretrained(str(out))
        return
    factors = lora_factors(run)
    options = {**(run.method.peft_options() or {}), **layout_options(run.model)}
    lora_config(factors, options, task, heads, base).save_pretrained(str(out))
    save_tensors(lora_state_dict(run.model, factors), out / "adapter_model.safetensors")


def export_merged(run: LoadedRun, out: Path) -> None:
    """Write the merged model and tokenizer into the (temporary) folder ``out``."""
    if isinstance(run.method, QuantizedBase):
        log.info("adapter=%s trained on a quantized base: the merged export holds the dequantized base weights "
                 "plus the adapter in full precision", run.cfg.adapter.name)
    model = unload(run.model, merge=True)
    if run.info.get("label_names"):
        model.config.id2label = dict(enumerate(run.info["label_names"]))
        model.config.label2id = {name: i for i, name in enumerate(run.info["label_names"])}
    model.save_pretrained(str(out))
    run.tokenizer.save_pretrained(str(out))


def export_quantized(run: LoadedRun, out: Path) -> None:
    """Write the run's config, run.json and adapter state (with the quantized base's packed tensors)."""
    if not isinstance(run.method, QuantizedBase):
        raise PetunerError(f"adapter={run.cfg.adapter.name} has no quantized base: use --format peft or merged")
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(run.cfg))
    (out / RUN_FILE).write_text(json.dumps({k: v for k, v in run.info.items() if k != "run_dir"}, indent=2))
    save_tensors(adapter_state_dict(run.model), out / ADAPTER_FILE)


def _check_request(fmt: str, dtype: str | None, as_lora: bool, rank: int | None, energy: float | None,
                   engine: str | None) -> None:
    """The options' own consistency, before anything is read."""
    from petuner.serving import ENGINES

    if fmt not in EXPORT_FORMATS:
        raise PetunerError(f"--format {fmt!r}: allowed: {', '.join(EXPORT_FORMATS)}")
    if fmt in ("gguf", "gguf-lora"):
        require("GGUF export")
    if dtype is not None and (fmt != "gguf" or dtype not in GGUF_DTYPES):
        raise PetunerError(f"--dtype {dtype}: only for --format gguf, one of {', '.join(GGUF_DTYPES)}")
    if engine is not None and (fmt != "peft" or engine not in ENGINES):
        raise PetunerError(f"--for {engine}: only with --format peft, one of {', '.join(ENGINES)}")
    if (as_lora or energy is not None) and fmt not in ("peft", "gguf-lora"):
        raise PetunerError(f"--as-lora/--energy with --format {fmt}: only for --format peft or gguf-lora")
    if energy is not None and not as_lora and fmt == "peft":
        raise PetunerError("--energy needs --as-lora")
    check_request(rank, energy)


def _converted(run: LoadedRun, rank: int | None, as_lora: bool, energy: float | None) -> Conversion | None:
    """Set a rank-dynamic adapter's rank; with ``as_lora`` the run as one plain LoRA (``--rank`` is then the
    truncation rank of a method that has a fixed one)."""
    dynamic = isinstance(run.method, RankDynamic)
    if rank is not None and dynamic:
        run.method.set_rank(run.model, rank)
    elif rank is not None and not as_lora:
        raise PetunerError(f"adapter={run.cfg.adapter.name} has a fixed rank; --rank needs a rank-dynamic "
                           "adapter (dylora), or --as-lora to truncate its update by SVD")
    return to_lora(run.model, None if dynamic else rank, energy) if as_lora else None


def export(run_dir: Path | str, fmt: str, out: Path | str, *, force: bool = False, rank: int | None = None,
           checkpoint: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
           as_lora: bool = False, energy: float | None = None, engine: str | None = None) -> Path:
    """Write ``run_dir`` to ``out`` as ``fmt``; ``rank`` truncates a rank-dynamic adapter (DyLoRA),
    ``checkpoint`` (best, last, step-N) picks the weights, ``dtype`` the GGUF tensor type; ``as_lora`` converts
    any method to plain LoRA (``rank`` or ``energy`` truncating its SVD, ``petuner.as_lora``); ``engine``
    checks the peft folder against a serving engine's rules and writes its command (``petuner.serving``)."""
    _check_request(fmt, dtype, as_lora, rank, energy, engine)
    out = Path(out)
    if fmt == "gguf":
        return _export_gguf(Path(run_dir), out, force=force, rank=rank, checkpoint=checkpoint,
                            dtype=dtype or "f16", trust_remote_code=trust_remote_code)
    if fmt == "gguf-lora":
        from petuner.gguf_lora import export_gguf_lora

        return export_gguf_lora(Path(run_dir), out, force=force, rank=rank, energy=energy, checkpoint=checkpoint,
                                trust_remote_code=trust_remote_code)
    _check_destination(out, force)
    _precheck(Path(run_dir), as_lora, rank, energy, engine, trust_remote_code)
    run = load(run_dir, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    conversion = _converted(run, rank, as_lora, energy)
    with atomic_dir(out, replace=True) as tmp:  # a kill at any moment leaves no half-written export
        if fmt == "peft":
            export_peft(run, tmp, conversion)
        else:
            {"merged": export_merged, "quantized": export_quantized}[fmt](run, tmp)
        if engine is not None:  # a rule that fails raises here: nothing is renamed into place
            _engine_files(run, engine, tmp, out)
        (tmp / "README.md").write_text(model_card(run, fmt))
        write_manifest(tmp, {"kind": f"export-{fmt}", "model": OmegaConf.to_container(run.cfg.model),
                             "task": run.info["task"], "label_names": run.info.get("label_names") or [],
                             "rank": rank, "data_kind": run.info.get("data_kind"),
                             "system_prompt": run.cfg.data.get("system_prompt")})
    log.info("exported %s (%s) to %s", run_dir, fmt, out)
    return out


def _precheck(run_dir: Path, as_lora: bool, rank: int | None, energy: float | None, engine: str | None,
              trust_remote_code: bool) -> None:
    """What the config and run.json decide (a conversion that needs a rank, an engine's rules), before loading."""
    from petuner.models import model_config
    from petuner.run_folder import check_remote_code, read_info
    from petuner.serving import precheck_engine

    cfg = read_config(run_dir)
    check_remote_code(cfg.model, run_dir, trust_remote_code)  # before model_config could import its code
    method = build_adapter(cfg.adapter)
    if as_lora:
        check_lora_form(method, rank, energy)
    if engine is not None:
        precheck_engine(engine, method, cfg.adapter, read_info(run_dir), as_lora=as_lora,
                        model_type=str(model_config(cfg.model).model_type),
                        quantized_base=isinstance(method, QuantizedBase))


def _engine_files(run: LoadedRun, engine: str, tmp: Path, out: Path) -> None:
    from petuner.serving import write_engine_files

    base = run.info.get("base_model") or "BASE_MODEL"  # a random-init base has no name to serve
    write_engine_files(engine, tmp, out, base, model_type=str(run.model.config.model_type),
                       quantized_base=isinstance(run.method, QuantizedBase))


def _export_gguf(run_dir: Path, out: Path, *, force: bool, rank: int | None, checkpoint: str | None, dtype: str,
                 trust_remote_code: bool) -> Path:
    """The merged model and its tokenizer as one GGUF file, checked for a writable architecture first."""
    from petuner.gguf_export import check_gguf_model, check_gguf_tokenizer, write_gguf
    from petuner.models import load_tokenizer, model_config
    from petuner.run_folder import check_remote_code, read_config

    if out.is_dir() or (out.exists() and not force):
        raise PetunerError(f"--out {out} exists; pass --force to replace it" if not out.is_dir()
                           else f"--out {out} is a folder; --format gguf writes a file (e.g. model.gguf)")
    cfg = read_config(run_dir)
    check_remote_code(cfg.model, run_dir, trust_remote_code)  # before model_config could import its code
    check_gguf_model(model_config(cfg.model), cfg.model.task, str(run_dir))
    check_gguf_tokenizer(load_tokenizer(cfg.model))  # before the weights load
    run = load(run_dir, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    if rank is not None:
        run.method.set_rank(run.model, rank)
    model = unload(run.model, merge=True)
    with atomic_file(out) as tmp:
        write_gguf(model, run.tokenizer, tmp, dtype, name=f"{run_dir.name} ({run.cfg.adapter.name}, petuner)")
    log.info("exported %s (gguf, %s) to %s", run_dir, dtype, out)
    return out
