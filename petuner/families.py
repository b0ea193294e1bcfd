"""What a model family (transformers' ``model_type``) needs from petuner, read off its config before weights load.

- Default targets (``model.lora_targets: auto``): peft's own per-family table
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, what peft picks when ``target_modules`` is unset),
  plus the families peft 0.21's table lacks, chosen the same way (the attention's query and value inputs, or
  the fused projection that holds them). A family in neither adapts every linear layer.
- Attention (``model.attn_implementation: auto``): sdpa where the model class supports it, else eager
  (Gemma 2's soft-capped attention has no sdpa path); an explicit choice the class refuses is one line here,
  not a ValueError after the data is built.
- Packing: a family whose attention mask ignores ``position_ids`` lets packed examples attend to each other;
  it is refused up front (``PACKING_LEAKS``), and every other model is probed once its weights load
  (``petuner.data.packing.check_packing_exact``).
"""

from __future__ import annotations

import logging
from typing import Any

from petuner.errors import ConfigError

log = logging.getLogger(__name__)

# Families peft 0.21's table lacks: the same choice (attention query + value, or their fused projection).
EXTRA_TARGETS: dict[str, list[str]] = {
    "phi3": ["qkv_proj"], "cohere": ["q_proj", "v_proj"], "granite": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"], "qwen3_moe": ["q_proj", "v_proj"], "gemma3": ["q_proj", "v_proj"],
    "granitemoe": ["q_proj", "v_proj"], "olmoe": ["q_proj", "v_proj"], "smollm3": ["q_proj", "v_proj"],
}
# A family's tiny random model (``model.random_init``): 2 layers, hidden size 64, the SmolLM2 tokenizer's vocabulary;
# the tests' architecture matrix and the GGUF benchmark build every family from these.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 49152, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
TINY_EXTRA: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
}
# transformers builds these families' attention masks without position_ids: packed rows would leak.
PACKING_LEAKS: dict[str, str] = {"falcon": "FalconForCausalLM builds its attention mask without position_ids"}


def tiny_random_init(model_type: str, **fields: Any) -> dict[str, Any]:
    """``model.random_init`` of the family's tiny model, ``fields`` over it."""
    return {"model_type": model_type, **TINY, **TINY_EXTRA.get(model_type, {}), **fields}


def default_targets(model_type: str | None) -> list[str] | str:
    """The family's default ``target_modules`` (peft's choice); "all-linear" for a family no table knows."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = PEFT_TARGETS.get(model_type or "") or EXTRA_TARGETS.get(model_type or "")
    if targets is None:
        log.info("model_type=%s has no default LoRA targets in peft's table: adapting all linear layers", model_type)
        return "all-linear"
    return list(targets)


def model_class(config: Any, task: str) -> type | None:
    """The transformers class ``task`` loads for ``config`` (None where the Auto class has no entry)."""
    from transformers.models.auto import modeling_auto

    mapping = {"causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING,
               "seq_cls": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}[task]
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def resolve_attention(requested: str, config: Any, task: str) -> str:
    """``model.attn_implementation`` for this model: auto is sdpa where its class supports it, else eager;
    an explicit implementation the class does not support is refused in one line."""
    cls = model_class(config, task)
    supports = {"eager": True, "sdpa": getattr(cls, "_supports_sdpa", True),
                "flash_attention_2": getattr(cls, "_supports_flash_attn", True)}
    if requested == "auto":
        return "sdpa" if supports["sdpa"] else "eager"
    if not supports.get(requested, True):
        name = cls.__name__ if cls is not None else config.model_type
        allowed = ", ".join(a for a, ok in supports.items() if ok)
        raise ConfigError(f"model.attn_implementation={requested}: {name} does not support it; allowed: "
                          f"{allowed} (or auto)")
    return requested


def check_family(model_cfg: Any, config: Any, packing: bool) -> None:
    """The family's refusals, before data or weights load: an attention implementation its class lacks, and
    data.packing=true on a family known to let packed examples attend to each other."""
    resolve_attention(model_cfg.get("attn_implementation", "sdpa"), config, model_cfg.get("task", "causal_lm"))
    reason = PACKING_LEAKS.get(getattr(config, "model_type", ""))
    if packing and reason:
        raise ConfigError(f"data.packing=true: model_type={config.model_type} would let packed examples attend to "
                          f"each other ({reason}); set data.packing=false")
