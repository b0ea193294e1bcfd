"""petuner: parameter-efficient fine-tuning of language models behind one Hydra command line.

A trained run, its adapter attached: ``model, tokenizer = petuner.load("adapters/<run>")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def _quiet() -> None:
    from petuner.quiet import hold_4bit_kernel_warning

    hold_4bit_kernel_warning()  # before anything imports bitsandbytes


_quiet()


def load(path: str | Path, *, trust_remote_code: bool = False, **kwargs: Any) -> tuple[Any, Any]:
    """A trained model (eval mode, CPU) and its tokenizer, from a run folder or a petuner export.

    Files listed in the folder's checksum manifest are verified before anything is loaded. A run folder
    gives petuner's model with its adapter (``checkpoint="best"|"last"|"step-N"`` picks other weights);
    a merged export the plain transformers model; a peft export the ``PeftModel`` on its rebuilt base.
    A folder whose model needs its own code is refused unless ``trust_remote_code=True`` is passed here:
    the folder's own ``trust_remote_code: true`` is a request, never a permission.
    """
    from petuner.errors import PetunerError
    from petuner.manifest import read_manifest, verify_manifest
    from petuner.run_folder import load as load_run
    from petuner.run_folder import load_export

    manifest = read_manifest(Path(path))
    if manifest is not None and manifest.get("kind", "").startswith("export-"):
        if kwargs:
            raise PetunerError(f"{', '.join(kwargs)}: {path} is an export, which holds one set of weights")
        return load_export(Path(path), verify_manifest(Path(path)), trust_remote_code=trust_remote_code)
    loaded = load_run(path, trust_remote_code=trust_remote_code, **kwargs)  # verifies the run folder's manifest itself
    return loaded.model, loaded.tokenizer


__all__ = ["__version__", "load"]
