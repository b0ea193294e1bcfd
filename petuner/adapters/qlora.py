"""QLoRA (Dettmers et al., 2023): a LoRA on top of a frozen 4-bit NormalFloat base.

Only the target modules are quantized (``target_modules: all-linear`` is the paper's setting). Each
target's weight is quantized by bitsandbytes (``Linear4bit``, NF4, blocks of 64, double
quantization of the absmaxes: 4.127 bits per weight; works on CPU and CUDA); the LoRA factors, their
init and scaling are ``LoRALinear``'s; merging and the merged export work on the dequantized base
(``QuantizedBaseLoRA``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterSchema
from petuner.adapters.capabilities import QuantizedBase
from petuner.adapters.lora import LoRABase, LoRABaseSchema
from petuner.adapters.quantized_base import QuantizedBaseLoRA
from petuner.adapters.registry import register_adapter
from petuner.quant import bits_per_param
from petuner.quiet import release_4bit_kernel_warning

NF4_BITS_PER_PARAM = bits_per_param(4, 64)  # bitsandbytes' NF4 at blocksize 64 with double quantization


def nf4_linear(linear: nn.Linear) -> nn.Module:
    """``linear`` as a bitsandbytes NF4 layer with double quantization, on the same device."""
    import bitsandbytes as bnb

    release_4bit_kernel_warning()
    weight = linear.weight
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=weight.dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    layer.bias = linear.bias
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first eval-mode forward
    # without gradients, and from then on computes through a kernel that has no backward: gradients
    # through the base would be silently lost in the training that follows an evaluation.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(weight.device)  # Params4bit quantizes on its move to a device


class QLoRALinear(QuantizedBaseLoRA):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard") -> None:
        super().__init__(base_layer, nf4_linear(base_layer), r=r, alpha=alpha, dropout=dropout, scaling=scaling)

    def base_weight(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        weight = self.base_layer.weight
        return dequantize_4bit(weight.data, weight.quant_state)


@dataclass
class QLoRASchema(LoRABaseSchema):
    name: str = "qlora"


@register_adapter
class QLoRA(LoRABase, QuantizedBase):
    """``adapter=qlora``: LoRA's options; the targets' weights are stored NF4 (bitsandbytes)."""

    name = "qlora"
    schema: ClassVar[type[AdapterSchema]] = QLoRASchema

    def make_layer(self, base_layer: nn.Linear) -> QLoRALinear:
        c = self.cfg
        return QLoRALinear(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, scaling=c.scaling)

    def export_note(self, fmt: str) -> str:
        if fmt == "peft":
            return ("These LoRA factors were trained over the base model with the weights of their target modules "
                    "NF4-quantized (bitsandbytes `quantize_4bit(w, blocksize=64, quant_type=\"nf4\", "
                    "compress_statistics=True)`, double quantization). Rebuild that base with "
                    "`petuner.load(<run folder>)`; on the full-precision base they are an approximation.")
        return ("The base was NF4-quantized during training: this model holds the dequantized base weights "
                "with the adapter merged, in full precision.")

    def report(self) -> dict[str, Any]:
        return {"bits_per_param": NF4_BITS_PER_PARAM, "quantization": "bitsandbytes nf4, double quant"}
