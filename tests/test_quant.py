"""petuner.quant's NormalFloat quantizer: codebooks, round-trip error, packing, storage size."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from petuner.quant import BITS, BLOCK_SIZES, NFLinear, bits_per_param, nf_codebook, quantize
from petuner.quant.nf import ABSMAX_GROUP, pack, unpack


def gaussian(rows: int = 256, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 7] = 0.5  # an outlier: its block gets a large scale, others must not suffer
    return w


def test_nf4_codebook_equals_bitsandbytes() -> None:
    torch.testing.assert_close(nf_codebook(4), bnb.functional.get_4bit_type("nf4", device="cpu"), atol=0, rtol=0)


@pytest.mark.parametrize("bits", BITS)
def test_codebook_is_normal_float(bits: int) -> None:
    levels = nf_codebook(bits)
    assert len(levels) == 2**bits and torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels > 0).sum() == 2 ** (bits - 1) and (levels < 0).sum() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (8 * 37,), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_is_within_half_a_level_of_each_block(bits: int) -> None:
    w = gaussian()
    q = quantize(w, bits, 64)
    err = (q.dequantize() - w).abs().view(-1, 64)
    levels = nf_codebook(bits)
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    absmax = w.abs().view(-1, 64).amax(1)
    scale = q.absmax()
    assert torch.all(scale >= absmax * (1 - 1e-6))  # the scale is rounded up: no value is clipped
    assert torch.all(scale <= absmax + q.scales.repeat_interleave(ABSMAX_GROUP)[: len(absmax)] / 255 + 1e-9)
    assert torch.all(err <= (scale * half_gap)[:, None] + 1e-7)


def test_error_falls_with_bits_and_nf4_is_as_good_as_bitsandbytes() -> None:
    w = gaussian()
    rel = {b: float((quantize(w, b, 64).dequantize() - w).norm() / w.norm()) for b in BITS}
    assert rel[2] > rel[3] > rel[4] > rel[8]
    assert rel[8] < 0.02 and rel[4] < 0.12
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = float((bnb.functional.dequantize_4bit(packed, state) - w).norm() / w.norm())
    assert rel[4] <= theirs * 1.02


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_packed_storage_equals_the_formula(bits: int, block_size: int) -> None:
    n = block_size * ABSMAX_GROUP * 2
    q = quantize(torch.randn(n // 128, 128), bits, block_size)
    assert q.nbytes() * 8 == n * (bits + 8 / block_size + 32 / (block_size * ABSMAX_GROUP))
    assert q.nbytes() * 8 == n * bits_per_param(bits, block_size)


def test_nf4_with_double_quantization_costs_4_127_bits() -> None:
    assert bits_per_param(4, 64) == pytest.approx(4.127, abs=5e-4)


def test_quantized_linear_holds_only_packed_weights_and_computes_with_the_dequantized_ones() -> None:
    linear = torch.nn.Linear(128, 64)
    layer = NFLinear(quantize(linear.weight, 3, 32), linear.bias)
    assert not any(p.shape == linear.weight.shape for p in layer.parameters())
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held * 8 == pytest.approx(linear.weight.numel() * bits_per_param(3, 32), rel=0.01)
    x = torch.randn(5, 128)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert (layer.dequantized_weight() - linear.weight).abs().max() < linear.weight.abs().max() * 0.3
