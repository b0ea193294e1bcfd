"""Quantized bases: block-wise NormalFloat quantization, LQ-LoRA's decomposition, bit allocation."""

from petuner.quant.allocate import allocate
from petuner.quant.lq import Decomposition, fisher_weights, low_rank, lq_decompose, weighted_error
from petuner.quant.nf import BITS, BLOCK_SIZES, NFLinear, NFQuantized, bits_per_param, nf_codebook, quantize

__all__ = ["BITS", "BLOCK_SIZES", "Decomposition", "NFLinear", "NFQuantized", "allocate", "bits_per_param",
           "fisher_weights", "low_rank", "lq_decompose", "nf_codebook", "quantize", "weighted_error"]
