"""Block-wise NormalFloat quantization with k ∈ {2, 3, 4, 8} bits, double-quantized scales, packed storage.

Written here because bitsandbytes quantizes to 4 bits only (NF4/FP4), while LQ-LoRA needs 2-, 3- and
8-bit NormalFloat too, and the error of every config for its bit allocation. The k-bit codebook is
QLoRA's construction (normal quantiles, an exact zero, 2^(k-1) positive and 2^(k-1)-1 negative
levels); at k = 4 it equals bitsandbytes' NF4 table (tests check it).

Storage of N values with k bits, blocks of B0 values and absmax groups of B1 blocks:

    codes          N·k bits, packed into uint8
    absmax codes   one uint8 per block: ceil(255 · absmax / group max), so the scale never shrinks
    group scales   one fp32 per B1 blocks (the group's largest absmax)

    bits = N·(k + 8/B0 + 32/(B0·B1));  NF4 with B0 = 64, B1 = 256 → 4.127 bits per parameter.

LQ-LoRA's grid of configs (``QuantConfig``, ``grid``): k ∈ {2, 3, 4, 8} × B0 ∈ {16, 32, 64} × the second
level, B1 ∈ {16, 64, 256} blocks per fp32 scale with 8-bit absmax codes (the paper's b1 = 8, b2 = fp32).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

BITS = (2, 3, 4, 8)
BLOCK_SIZES = (16, 32, 64)
ABSMAX_BITS = 8
ABSMAX_GROUP = 256  # B1: blocks sharing one fp32 scale (the default, QLoRA's)
GROUP_SIZES = (16, 64, 256)
SCALE_BITS = 32
_ABSMAX_LEVELS = 2**ABSMAX_BITS - 1


def bits_per_param(bits: int, block_size: int, group_size: int = ABSMAX_GROUP) -> float:
    """Storage cost of one quantized value, scales included: k + b1/B0 + b2/(B0·B1)."""
    return bits + ABSMAX_BITS / block_size + SCALE_BITS / (block_size * group_size)


@dataclass(frozen=True)
class QuantConfig:
    """One NormalFloat config: k bits, B0 values per absmax, B1 absmaxes (8-bit codes) per fp32 scale."""

    bits: int
    block_size: int
    group_size: int = ABSMAX_GROUP

    @property
    def bits_per_param(self) -> float:
        return bits_per_param(self.bits, self.block_size, self.group_size)


def grid() -> list[QuantConfig]:
    """LQ-LoRA's candidate configs for the bit allocation: bits × first-level block × second-level block."""
    return [QuantConfig(*c) for c in itertools.product(BITS, BLOCK_SIZES, GROUP_SIZES)]


@functools.cache
def _codebook_cpu(bits: int) -> torch.Tensor:
    from scipy.stats import norm

    n = 2**bits
    # QLoRA's offset ½(1/(2·2^k) + 1/(2·(2^k−1))) from 1; bitsandbytes writes it to 7 decimals.
    offset = round(1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1))), 7)
    positive = norm.ppf(torch.linspace(offset, 0.5, n // 2 + 1)[:-1]).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, n // 2)[:-1])).tolist()
    values = torch.tensor([*positive, 0.0, *negative]).sort().values
    return values / values.max()


@functools.cache  # per device too: dequantize() runs in every forward and should not copy it each time
def nf_codebook(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 2^k NormalFloat levels in [-1, 1], ascending."""
    return _codebook_cpu(bits).to(device)


def block_scales(absmax_codes: torch.Tensor, scales: torch.Tensor, group_size: int = ABSMAX_GROUP) -> torch.Tensor:
    """Each block's dequantized absmax: its 8-bit code times the fp32 scale of its group of ``group_size``."""
    return absmax_codes.float() / _ABSMAX_LEVELS * scales.repeat_interleave(group_size)[: absmax_codes.numel()]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack k-bit codes (length a multiple of 8) into uint8: every 8 codes become k bytes, LSB first."""
    if bits == 8:
        return codes.to(torch.uint8)
    groups = codes.long().view(-1, 8) << (bits * torch.arange(8, device=codes.device))
    word = groups.sum(1, keepdim=True)  # 8·k ≤ 64 bits
    return ((word >> (8 * torch.arange(bits, device=codes.device))) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: int64 codes."""
    if bits == 8:
        return packed.long()
    word = (packed.long().view(-1, bits) << (8 * torch.arange(bits, device=packed.device))).sum(1, keepdim=True)
    return ((word >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)).reshape(-1)


@dataclass
class NFQuantized:
    """A tensor quantized block-wise to NormalFloat; only the packed fields are stored."""

    codes: torch.Tensor  # uint8, N_pad·k/8
    absmax_codes: torch.Tensor  # uint8, one per block
    scales: torch.Tensor  # fp32, one per group of group_size blocks
    shape: tuple[int, ...]
    bits: int
    block_size: int
    group_size: int = ABSMAX_GROUP

    @classmethod
    def empty(cls, shape: tuple[int, int], config: QuantConfig, device: torch.device | str = "cpu") -> NFQuantized:
        """Zero storage of the right sizes for ``config``, to be filled from a saved state."""
        n_blocks = -(-int(torch.Size(shape).numel()) // config.block_size)
        n_groups = -(-n_blocks // config.group_size)
        return cls(torch.zeros(n_blocks * config.block_size * config.bits // 8, dtype=torch.uint8, device=device),
                   torch.zeros(n_blocks, dtype=torch.uint8, device=device),
                   torch.zeros(n_groups, dtype=torch.float32, device=device), tuple(shape), config.bits,
                   config.block_size, config.group_size)

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(self.bits, self.block_size, self.group_size)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax_codes, self.scales))

    def absmax(self) -> torch.Tensor:
        """The dequantized per-block scales."""
        return block_scales(self.absmax_codes, self.scales, self.group_size)

    def dequantize(self) -> torch.Tensor:
        codebook = nf_codebook(self.bits, self.codes.device)
        values = codebook[unpack(self.codes, self.bits)].view(-1, self.block_size)
        return (values * self.absmax().unsqueeze(1)).reshape(-1)[: self.numel].view(self.shape)


def quantize(weight: torch.Tensor, bits: int, block_size: int, group_size: int = ABSMAX_GROUP) -> NFQuantized:
    """Round every value to the nearest NormalFloat level of its block (absmax-scaled)."""
    return round_nf(weight, bits, block_size, group_size).packed()


@dataclass
class Rounded:
    """``quantize``'s result before packing: the codes and the dequantized values, for the LQ iterations."""

    codes: torch.Tensor  # int64, one per value (padded to whole blocks)
    absmax_codes: torch.Tensor
    scales: torch.Tensor
    dense: torch.Tensor  # the dequantized tensor, weight's shape
    bits: int
    block_size: int
    group_size: int = ABSMAX_GROUP

    def packed(self) -> NFQuantized:
        return NFQuantized(pack(self.codes, self.bits), self.absmax_codes, self.scales, tuple(self.dense.shape),
                           self.bits, self.block_size, self.group_size)


def nearest_level(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The index of the nearest level (ties to the lower): ``torch.bucketize`` on the midpoints, which for
    up to 16 levels is computed as a count of midpoints below each value (the same result, ~2× faster on CPU)."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    if len(codebook) > 16:
        return torch.bucketize(values, midpoints)
    codes = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for m in midpoints.tolist():
        codes += values > m
    return codes.long()


def round_nf(weight: torch.Tensor, bits: int, block_size: int, group_size: int = ABSMAX_GROUP) -> Rounded:
    if bits not in BITS:
        raise ValueError(f"bits={bits}: allowed {BITS}")
    flat = weight.detach().float().reshape(-1)
    n_blocks = -(-flat.numel() // block_size)
    blocks = F.pad(flat, (0, n_blocks * block_size - flat.numel())).view(n_blocks, block_size)
    absmax = blocks.abs().amax(1)
    n_groups = -(-n_blocks // group_size)
    scales = F.pad(absmax, (0, n_groups * group_size - n_blocks)).view(n_groups, group_size).amax(1)
    group_scale = scales.repeat_interleave(group_size)[:n_blocks]
    ratio = torch.where(group_scale > 0, absmax / group_scale, torch.zeros_like(absmax))
    absmax_codes = torch.ceil(ratio * _ABSMAX_LEVELS).clamp(0, _ABSMAX_LEVELS).to(torch.uint8)
    scale = block_scales(absmax_codes, scales, group_size).unsqueeze(1)
    normalized = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks)).clamp(-1, 1)
    codebook = nf_codebook(bits, flat.device)
    codes = nearest_level(normalized, codebook)
    dense = (codebook[codes] * scale).reshape(-1)[: flat.numel()].view(weight.shape)
    return Rounded(codes.reshape(-1), absmax_codes, scales, dense, bits, block_size, group_size)


class NFLinear(nn.Module):
    """A frozen linear layer whose weight is held NF-quantized and packed; dequantized in the forward."""

    def __init__(self, q: NFQuantized, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.block_size, self.group_size = q.bits, q.block_size, q.group_size
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax_codes", q.absmax_codes)
        self.register_buffer("scales", q.scales)
        self.bias = bias

    def quantized(self) -> NFQuantized:
        return NFQuantized(self.codes, self.absmax_codes, self.scales, (self.out_features, self.in_features),
                           self.bits, self.block_size, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"block_size={self.block_size}, group_size={self.group_size}"
