"""Several runs on one base at inference: ``petuner generate RUN --adapter NAME=RUN2 ...`` and ``petuner chat``.

Every run becomes a named adapter of one ``peft.PeftModel`` over one copy of the base, so a batch can mix them
row by row through peft's ``adapter_names`` (LoRAX-style multi-adapter serving). RUN itself is ``default``;
``base`` is the base model with no adapter (peft's ``__base__``). Each run enters in its plain-LoRA form
(``petuner.as_lora``: exact for LoRA-shaped methods), because peft's mixed batches take plain LoRA layers only
(not DoRA). A run whose update is no LoRA (DoRA, LoHa, VeRA, ...) is refused with its fix: ``petuner merge RUN
--method task_arithmetic --weights 1`` writes it as an exact LoRA-form run (its update's full SVD) to name instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from petuner.errors import PetunerError

DEFAULT, BASE = "default", "base"


def parse_adapters(specs: list[str] | None) -> dict[str, Path]:
    """``--adapter NAME=RUN`` options as {name: run folder}; names unique and not ``default``/``base``."""
    adapters: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PetunerError(f"--adapter {spec!r}: expected NAME=RUN_DIR")
        if name in (DEFAULT, BASE) or name in adapters:
            raise PetunerError(f"--adapter {name}: the name is taken ({DEFAULT}: the first run, {BASE}: no adapter,"
                               f" or given twice)")
        adapters[name] = Path(path)
    return adapters


def route(names: list[str | None], loaded: tuple[str, ...]) -> list[str]:
    """Each prompt's adapter (none given: ``default``); a name that is not loaded is one line."""
    routed = [name or DEFAULT for name in names]
    for number, name in enumerate(routed, start=1):
        if name not in loaded:
            raise PetunerError(f"prompt {number}: adapter {name!r} is not loaded; allowed: {', '.join(loaded)}")
    return routed


def _peft_folder(run_dir: Path, out: Path, trust_remote_code: bool) -> Path:
    """The run's plain-LoRA peft form in ``out`` (exact for LoRA-shaped methods)."""
    from petuner.adapters import build_adapter
    from petuner.as_lora import to_lora
    from petuner.export import export_peft
    from petuner.run_folder import load, read_config

    options = build_adapter(read_config(run_dir).adapter).peft_options()
    if options is None or options.get("use_dora"):
        raise PetunerError(f"{run_dir}: its update is no LoRA, which peft's mixed batches cannot serve; write it as "
                           f"one with petuner merge {run_dir} --method task_arithmetic --weights 1 --out NEW_RUN "
                           "and name NEW_RUN")
    run = load(run_dir, trust_remote_code=trust_remote_code, tokenizer=False)
    out.mkdir()
    export_peft(run, out, to_lora(run.model))
    return out


def load_multi(run_dir: Path | str, adapters: dict[str, Path], *, trust_remote_code: bool = False) -> Any:
    """A ``Generator`` over one base holding ``run_dir`` (``default``) and each of ``adapters`` by name."""
    from peft import PeftModel

    from petuner.generate import Generator, load_generator
    from petuner.merge import check_same_base
    from petuner.models import load_model
    from petuner.run_folder import read_config

    run_dir = Path(run_dir)
    check_same_base([run_dir, *adapters.values()], "--adapter")
    single = load_generator(run_dir, trust_remote_code=trust_remote_code)  # its tokenizer and prompt format
    with tempfile.TemporaryDirectory() as work:
        base = load_model(read_config(run_dir).model)
        model = PeftModel.from_pretrained(base, str(_peft_folder(run_dir, Path(work) / DEFAULT, trust_remote_code)),
                                          adapter_name=DEFAULT)
        for name, path in adapters.items():
            model.load_adapter(str(_peft_folder(path, Path(work) / name, trust_remote_code)), adapter_name=name)
    return Generator(model.eval(), single.tokenizer, single.chat_format, single.system_prompt,
                     adapters=(DEFAULT, *adapters, BASE), active=DEFAULT)
