"""Quantized bases: block-wise NormalFloat quantization, LQ-LoRA's decomposition, bit allocation."""

from petuner.quant.allocate import allocate
from petuner.quant.lq import Decomposition, fisher_weights, low_rank, lq_decompose, weighted_error
from petuner.quant.nf import (
    BITS,
    BLOCK_SIZES,
    GROUP_SIZES,
    NFLinear,
    NFQuantized,
    QuantConfig,
    bits_per_param,
    grid,
    nf_codebook,
    quantize,
)

__all__ = ["BITS", "BLOCK_SIZES", "GROUP_SIZES", "Decomposition", "NFLinear", "NFQuantized", "QuantConfig", "allocate",
           "bits_per_param", "fisher_weights", "grid", "low_rank", "lq_decompose", "nf_codebook", "quantize",
           "weighted_error"]
