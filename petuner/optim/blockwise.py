"""Adam moments stored 8-bit with bitsandbytes' block-wise quantization (Dettmers et al., 2022).

Each moment is uint8 codes plus one fp32 absmax per block of 256 values; the first moment uses
bitsandbytes' signed dynamic map, the second its unsigned one. A step dequantizes, updates in fp32
and requantizes. Tensors under ``min_8bit_size`` elements keep fp32 moments, as bitsandbytes does.
The quantizer itself is bitsandbytes' (``quantize_blockwise``/``dequantize_blockwise``); this module
only keeps the codes and absmaxes as plain tensors so they sit in ``optimizer.state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer states
MOMENTS = ("exp_avg", "exp_avg_sq")


class DynamicMaps:
    """bitsandbytes' dynamic quantization maps, one copy per device."""

    def __init__(self) -> None:
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            from bitsandbytes.functional import create_dynamic_map

            self._maps[device] = (create_dynamic_map(signed=True).to(device),
                                  create_dynamic_map(signed=False).to(device))
        return self._maps[device]

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self._maps.values() for t in pair]


def init_moments(state: dict[str, Any], like: torch.Tensor, quantized: bool) -> None:
    """Zero moments shaped like the (projected) gradient; uint8 codes + absmax when ``quantized``."""
    for key in MOMENTS:
        if quantized:
            blocks = -(-like.numel() // BLOCKSIZE)
            state[key] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
            state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
        else:
            state[key] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)


def load_moments(state: dict[str, Any], maps: DynamicMaps) -> tuple[torch.Tensor, torch.Tensor]:
    """The moments in fp32 (dequantized copies for 8-bit state, the tensors themselves otherwise)."""
    if state["exp_avg"].dtype != torch.uint8:
        return state["exp_avg"], state["exp_avg_sq"]
    from bitsandbytes.functional import dequantize_blockwise

    codes = maps.get(state["exp_avg"].device)
    return tuple(dequantize_blockwise(state[key], absmax=state[f"{key}_absmax"], code=code, blocksize=BLOCKSIZE)
                 for key, code in zip(MOMENTS, codes, strict=True))  # type: ignore[return-value]


def store_moments(state: dict[str, Any], moments: tuple[torch.Tensor, torch.Tensor], maps: DynamicMaps) -> None:
    """Requantize updated fp32 moments into 8-bit state (a no-op for fp32 state, updated in place)."""
    if state["exp_avg"].dtype != torch.uint8:
        return
    from bitsandbytes.functional import quantize_blockwise

    codes = maps.get(state["exp_avg"].device)
    for key, value, code in zip(MOMENTS, moments, codes, strict=True):
        quantize_blockwise(value, code=code, absmax=state[f"{key}_absmax"], out=state[key], blocksize=BLOCKSIZE)
