"""Exports a serving engine takes: ``petuner export RUN --format peft --for vllm|sglang|llama.cpp|ollama``.

Each engine accepts only some peft folders, and several fail silently rather than loudly (vLLM serves the
base model when an adapter targets none of its modules, vllm#55193; llama.cpp's ``convert_lora_to_gguf.py``
reads only ``lora_alpha`` and so mis-scales rsLoRA and rank/alpha patterns). The written folder's
``adapter_config.json`` is checked against the engine's rules before the export is renamed into place: a
rule that fails stops the export with one line naming it and the option that fixes it (usually
``--as-lora``, which folds every variant into plain LoRA), and nothing is written. A folder that passes gets
the engine's command beside its files (``serve-<engine>.sh``, for Ollama a ``Modelfile``).

The rules, as of the engines' releases of late 2026 (vllm/lora/peft_helper.py, SGLang's LoRA manager,
llama.cpp's convert_lora_to_gguf.py, Ollama's ADAPTER documentation):

- every engine: ``peft_type`` LORA only, no DoRA, no ``modules_to_save`` (trained heads or embeddings), and
  every target among the decoder's projections the engine serves;
- vLLM: ``r`` at most 512 (the server's ``--max-lora-rank`` is the smallest of its buckets 1, 8, 16, 32, 64,
  128, 256, 320, 512 holding ``r``; vLLM pads the adapter to it), no rank/alpha patterns, no bias;
- SGLang: the same, with the rank and targets declared on the command line;
- llama.cpp and Ollama: no ``use_rslora`` and no patterns (only ``lora_alpha`` is read);
- Ollama: a Llama, Mistral or Gemma base, not a quantized one (QLoRA, LQ-LoRA).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petuner.errors import PetunerError

ENGINES = ("vllm", "sglang", "llama.cpp", "ollama")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The decoder projections the engines apply LoRA to (Llama-style names, which Mistral, Qwen2, Gemma share).
SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OLLAMA_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3")
AS_LORA = "pass --as-lora (add --rank R or --energy E for a method whose update is no LoRA)"


def engine_rank(engine: str, r: int) -> int:
    """The ``--max-lora-rank`` an engine is started with for an adapter of rank ``r``."""
    if engine == "vllm":
        fits = [bucket for bucket in VLLM_RANKS if bucket >= r]
        if not fits:
            raise PetunerError(f"--for vllm: rank {r} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}; "
                               f"pass --as-lora --rank {VLLM_RANKS[-1]} (or lower) to truncate it")
        return fits[0]
    return r


def _common_rules(engine: str, config: dict[str, Any]) -> None:
    where = f"--for {engine}"
    if config.get("peft_type") != "LORA":
        raise PetunerError(f"{where}: the adapter is peft_type {config.get('peft_type')}, the engine takes LoRA "
                           f"only; {AS_LORA}")
    if config.get("use_dora"):
        raise PetunerError(f"{where}: the engine does not serve DoRA (use_dora); {AS_LORA}")
    if config.get("modules_to_save"):
        raise PetunerError(f"{where}: the adapter trains whole modules (modules_to_save: "
                           f"{', '.join(config['modules_to_save'])}), which the engine refuses; use --format merged")
    targets = sorted(config.get("target_modules") or [])
    unserved = [t for t in targets if t.rsplit(".", 1)[-1] not in SERVED_MODULES]
    if unserved or not targets:
        raise PetunerError(f"{where}: the adapter targets {', '.join(unserved) or 'no module'}, which the engine "
                           f"does not serve (it serves {', '.join(SERVED_MODULES)}) and would silently leave out; "
                           "train with those targets or use --format merged")


def _plain_scale_rules(engine: str, config: dict[str, Any], *, rslora_ok: bool) -> None:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise PetunerError(f"--for {engine}: the adapter has per-layer ranks or scales (rank_pattern/alpha_pattern), "
                           "which the engine ignores (it scales every layer by lora_alpha/r); pass --as-lora to "
                           "fold them into one rank and lora_alpha")
    if config.get("use_rslora") and not rslora_ok:
        raise PetunerError(f"--for {engine}: the engine ignores use_rslora (it scales by lora_alpha/r); pass "
                           "--as-lora to fold the rsLoRA scale into lora_alpha")


def check_engine(engine: str, config: dict[str, Any], *, model_type: str, quantized_base: bool) -> None:
    """Raise (one line: the rule and the option that fixes it) unless ``engine`` takes this peft config."""
    if engine not in ENGINES:
        raise PetunerError(f"--for {engine!r}: allowed: {', '.join(ENGINES)}")
    _common_rules(engine, config)
    _plain_scale_rules(engine, config, rslora_ok=engine == "vllm")
    if engine in ("vllm", "sglang") and config.get("bias", "none") != "none":
        raise PetunerError(f"--for {engine}: the adapter trains biases (bias={config['bias']}), which the engine "
                           "does not load; use --format merged")
    engine_rank(engine, int(config["r"]))
    if engine == "ollama":
        if model_type not in OLLAMA_FAMILIES:
            raise PetunerError(f"--for ollama: Ollama's ADAPTER takes Llama, Mistral and Gemma bases, this one is "
                               f"{model_type}; use --format gguf (the merged model) instead")
        if quantized_base:
            raise PetunerError("--for ollama: the adapter was trained over a quantized base (QLoRA/LQ-LoRA), which "
                               "Ollama's ADAPTER does not support; use --format gguf (the merged model)")


def precheck_engine(engine: str, method: Any, adapter_cfg: Any, info: dict[str, Any], *, as_lora: bool,
                    model_type: str, quantized_base: bool) -> None:
    """The rules a run's config and run.json already decide, checked before any weights load: the adapter's
    kind (unless ``--as-lora`` converts it), trained heads, targets, biases, the base's family."""
    options = method.peft_options()
    predicted = {"peft_type": "LORA" if options is not None or as_lora else
                 str(adapter_cfg.get("peft_type") or adapter_cfg.name).upper(),
                 "use_dora": bool(options and options.get("use_dora")) and not as_lora,
                 "use_rslora": bool(options and options.get("use_rslora")) and not as_lora,
                 "modules_to_save": info.get("head_modules") or None, "target_modules": info.get("targets"),
                 "bias": (options or {}).get("bias", "none"), "r": 1}
    check_engine(engine, predicted, model_type=model_type, quantized_base=quantized_base)


def _vllm(base: str, folder: Path, name: str, config: dict[str, Any]) -> str:
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(f'{name}={folder}')} "
            f"--max-lora-rank {engine_rank('vllm', int(config['r']))}")


def _sglang(base: str, folder: Path, name: str, config: dict[str, Any]) -> str:
    modules = " ".join(sorted({t.rsplit(".", 1)[-1] for t in config["target_modules"]}))
    return (f"python -m sglang.launch_server --model-path {shlex.quote(base)} --enable-lora "
            f"--lora-paths {shlex.quote(f'{name}={folder}')} --max-loras-per-batch 1 "
            f"--max-lora-rank {config['r']} --lora-target-modules {modules}")


def _llama_cpp(base: str, folder: Path, name: str, config: dict[str, Any]) -> str:
    gguf = folder.parent / f"{name}.gguf"
    return (f"# petuner export RUN --format gguf-lora --out {shlex.quote(str(gguf))} writes the same file directly\n"
            f"python convert_lora_to_gguf.py {shlex.quote(str(folder))} --base {shlex.quote(base)} "
            f"--outfile {shlex.quote(str(gguf))}\n"
            f"llama-server -m BASE.gguf --lora {shlex.quote(str(gguf))}")


COMMANDS: dict[str, Callable[[str, Path, str, dict[str, Any]], str]] = {
    "vllm": _vllm, "sglang": _sglang, "llama.cpp": _llama_cpp}


def write_engine_files(engine: str, tmp: Path, final: Path, base: str, *, model_type: str,
                       quantized_base: bool) -> Path:
    """Check the peft folder being written in ``tmp`` (to become ``final``) and write the engine's command
    beside its files; returns the file written."""
    config = json.loads((tmp / "adapter_config.json").read_text())
    check_engine(engine, config, model_type=model_type, quantized_base=quantized_base)
    name = final.name
    if engine == "ollama":
        path = tmp / "Modelfile"
        path.write_text(f"# ollama create {name} -f {final / 'Modelfile'}\nFROM {base}\nADAPTER {final}\n")
        return path
    path = tmp / f"serve-{engine}.sh"
    path.write_text(f"#!/bin/sh\n# serve {name} over its base with {engine}\n"
                    f"{COMMANDS[engine](base, final.resolve(), name, config)}\n")
    path.chmod(0o755)
    return path
