"""A run as a llama.cpp LoRA adapter GGUF (``petuner export RUN --format gguf-lora``), loaded over the base's
GGUF by llama.cpp (``--lora``) and Ollama (``ADAPTER``).

Written with the ``gguf`` package, in the layout llama.cpp's ``convert_lora_to_gguf.py`` writes:
``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``, and for each adapted matrix the two
tensors ``<its GGUF name>.lora_a`` (r × in) and ``.lora_b`` (out × r). llama.cpp scales each pair by
``alpha / r`` with r read from the tensor, and knows neither rsLoRA nor per-layer patterns: the factors are
the plain form of ``petuner.as_lora`` (one rank, one scale, rsLoRA and patterns folded in; ``--rank`` or
``--energy`` truncate a method whose update is no LoRA). q and k get the rotary row permutation of the merged
GGUF export (``petuner.gguf_export.permute_rotary``): it acts on output rows, so only B is permuted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from petuner.as_lora import Conversion, check_lora_form, to_lora
from petuner.errors import PetunerError
from petuner.gguf_export import permute_rotary
from petuner.io import atomic_file

log = logging.getLogger(__name__)


def lora_tensors(conversion: Conversion, config: object) -> dict[str, torch.Tensor]:
    """GGUF name → tensor for every layer's A and B (q/k's B permuted as the base GGUF's rows are)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {}
    for module, f in conversion.factors.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise PetunerError(f"--format gguf-lora: no GGUF name for the adapted module {module}")
        b = f.B.detach().float()
        if module.endswith("self_attn.q_proj"):
            b = permute_rotary(b, config.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            b = permute_rotary(b, config.num_key_value_heads)
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = f.A.detach().float(), b
    return tensors


def write_gguf_lora(conversion: Conversion, config: object, out: Path, name: str) -> None:
    """Write ``conversion``'s factors as an f32 LoRA adapter GGUF for a Llama-architecture base."""
    import gguf

    factors = next(iter(conversion.factors.values()))
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(factors.scaling * factors.A.shape[0]))
    for key, tensor in lora_tensors(conversion, config).items():
        writer.add_tensor(key, tensor.cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf_lora(run_dir: Path, out: Path, *, force: bool, rank: int | None, energy: float | None,
                     checkpoint: str | None, trust_remote_code: bool) -> Path:
    """The run's adapter as a LoRA GGUF file, checked for a writable architecture and a LoRA form first."""
    from petuner.adapters import build_adapter
    from petuner.adapters.capabilities import RankDynamic
    from petuner.gguf_export import check_gguf_model
    from petuner.models import model_config
    from petuner.run_folder import check_remote_code, load, read_config, read_info

    if out.is_dir() or (out.exists() and not force):
        raise PetunerError(f"--out {out} exists; pass --force to replace it" if not out.is_dir()
                           else f"--out {out} is a folder; --format gguf-lora writes a file (e.g. adapter.gguf)")
    cfg = read_config(run_dir)
    check_remote_code(cfg.model, run_dir, trust_remote_code)
    check_gguf_model(model_config(cfg.model), cfg.model.task, str(run_dir))
    if read_info(run_dir).get("head_modules"):
        raise PetunerError("--format gguf-lora: the run trained whole modules besides its adapter "
                           f"({', '.join(read_info(run_dir)['head_modules'])}); use --format gguf")
    method = build_adapter(cfg.adapter)
    check_lora_form(method, rank, energy)
    if (method.peft_options() or {}).get("bias", "none") != "none":
        raise PetunerError(f"--format gguf-lora: the run trained biases (adapter.bias={cfg.adapter.bias}), which a "
                           "LoRA GGUF cannot hold; use --format gguf")
    dynamic = isinstance(method, RankDynamic)
    run = load(run_dir, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    if dynamic and rank is not None:
        run.method.set_rank(run.model, rank)
    conversion = to_lora(run.model, None if dynamic else rank, energy)
    with atomic_file(out) as tmp:
        write_gguf_lora(conversion, run.model.config, tmp, name=f"{run_dir.name} ({run.cfg.adapter.name}, petuner)")
    log.info("exported %s (gguf-lora, rank %d, relative error %.3g) to %s", run_dir, conversion.report["rank"],
             conversion.report["overall_relative_error"], out)
    return out

