"""LoRA (Hu et al., 2021): y = W x + s · B A dropout(x), with W frozen; and its peft variants.

A (r × in) starts Kaiming-uniform, B (out × r) at zero, so training starts from the base model.
s = alpha / r, or alpha / sqrt(r) with ``scaling: rslora`` (Kalajdzievski, 2023).

Variants (each as peft implements it, which the parity tests check on the same weights):

- ``init: gaussian``: A ~ N(0, 1/r²), B = 0 (peft's ``init_lora_weights="gaussian"``).
- ``init: pissa`` (Meng et al., 2024): with W = V S Uh (SVD), A = √(S_r/s)·Uh_r and
  B = V_r·√(S_r/s), so that s·B A is W's best rank-r part; the frozen base becomes the residual
  W − s·B₀A₀ (peft's ``init_lora_weights="pissa"``, full SVD). The initial factors are kept as
  buffers: disabling the adapter gives back the original W (peft's disable gives the residual;
  ``unload(merge=False)`` leaves the residual base), and
  the update relative to the original W is the rank-2r LoRA [B, −B₀]·[A; A₀] — peft's own
  PiSSA-to-LoRA conversion, which is how it exports.
- ``variant: dora`` (Liu et al., 2024): W' = m ⊙ (W + s·B A) / ‖W + s·B A‖ per output row, with a
  trained magnitude m (init ‖W‖) and the norm detached from the graph (DoRA §4.3, as peft).

Parameter names match peft's ``LoraLayer`` (``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector.weight``), so a state dict is a peft one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from petuner.adapters.base import (
    AdapterLayer,
    AdapterMethod,
    AdapterSchema,
    Injection,
    LoRAFactors,
)
from petuner.adapters.capabilities import SwitchesOff
from petuner.adapters.registry import register_adapter
from petuner.adapters.targets import check_rank_fits, match_targets
from petuner.errors import ConfigError
from petuner.schema import checked, choice, number

SCALINGS = ("standard", "rslora")
BIASES = ("none", "all", "lora_only")
INITS = ("kaiming", "gaussian", "pissa")
VARIANTS = ("standard", "dora")


def check_target_modules(cfg: Any, key: str, group: str) -> None:
    value = cfg.get(key)
    if not (isinstance(value, str) and value) and not (isinstance(value, Sequence) and value
                                                       and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{group}.{key}={value!r}: name the layers to adapt: a list of module names, "
                          "\"all-linear\" or a regex")


@dataclass
class LoRACoreSchema(AdapterSchema):
    """What every LoRA-shaped method takes (DyLoRA and SoRA add their own options to these)."""

    r: int = number(8, integer=True)
    alpha: float = number(16.0)
    dropout: float = number(0.05, strict=False, below=1)
    target_modules: Any = checked("all-linear", check_target_modules)  # names (suffix match), all-linear, a regex


@dataclass
class LoRABaseSchema(LoRACoreSchema):
    """LoRA's options that QLoRA, LQ-LoRA and Block-LoRA share."""

    scaling: str = choice("standard", SCALINGS)
    bias: str = choice("none", BIASES)


@dataclass
class LoRASchema(LoRABaseSchema):
    name: str = "lora"
    init: str = choice("kaiming", INITS)
    variant: str = choice("standard", VARIANTS)


def lora_scaling(alpha: float, r: int, scaling: str) -> float:
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming", a_in_features: int | None = None) -> None:
        """``a_in_features``: A's input width, the layer's unless a variant narrows it (Block-LoRA)."""
        super().__init__(base_layer)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.r = r
        self.init = init
        self.scaling = lora_scaling(alpha, r, scaling)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(a_in_features or base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "pissa":
            self.pissa_init()
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def pissa_init(self) -> None:
        """Move W's top-r singular part into A, B; the base keeps the residual (peft's recipe, in fp32)."""
        weight = self.base_layer.weight
        v, s, uh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(s[:self.r] / self.scaling)
        a, b = (root[:, None] * uh[:self.r]).contiguous(), (v[:, :self.r] * root).contiguous()
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        weight.copy_(weight.float() - self.scaling * b @ a)
        self.register_buffer("pissa_A0", a.to(weight.dtype))
        self.register_buffer("pissa_B0", b.to(weight.dtype))

    @property
    def pissa(self) -> bool:
        return self.init == "pissa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.pissa:  # the base model is the residual plus the initial factors
            out = self.base_layer(x)
            x = x.to(self.pissa_A0.dtype)
            return out + (F.linear(F.linear(x, self.pissa_A0), self.pissa_B0) * self.scaling).to(out.dtype)
        return super().forward(x)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        # s scales the r-wide intermediate, not the output: the same product, one pass over r columns
        # instead of out_features, forward and backward
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def weight_update(self) -> torch.Tensor:
        """PiSSA: the base holds W − s·B₀A₀, so the update relative to W is ΔW − s·B₀A₀ (DoRA's too)."""
        delta = self.delta_weight()
        return delta - self.scaling * self.pissa_B0 @ self.pissa_A0 if self.pissa else delta

    def lora_view(self) -> LoRAFactors:
        """The update relative to the original base weight (PiSSA: rank 2r, its initial part subtracted)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.pissa:
            a, b = torch.cat([a, self.pissa_A0]), torch.cat([b, -self.pissa_B0], dim=1)
        return LoRAFactors(A=a, B=b, scaling=self.scaling)


class Magnitude(nn.Module):
    """DoRA's per-output magnitude, held as ``.weight`` like peft's ``DoraLinearLayer``."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value)


class DoRALinear(LoRALinear):
    """LoRA with weight decomposition: the output rows of W + s·B A rescaled to a trained magnitude."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming") -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, scaling=scaling, init=init)
        with torch.no_grad():
            self.lora_magnitude_vector = Magnitude(self.weight_norm())
        self._merged_delta: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row, detached (DoRA §4.3: the norm is treated as a constant)."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach()
        return torch.linalg.norm(self.base_layer.weight + self.scaling * lora_weight, dim=1).detach()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        mag_scale = self.lora_magnitude_vector.weight / self.weight_norm()
        base = F.linear(x, self.base_layer.weight.to(x.dtype))  # as peft: W in the adapter's dtype
        return (mag_scale - 1) * base + mag_scale * self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        combined = weight + self.scaling * self.lora_B.weight @ self.lora_A.weight
        return (self.lora_magnitude_vector.weight / self.weight_norm())[:, None] * combined - weight

    # ΔW depends on W itself: the delta merged in is kept so that unmerge removes exactly it.
    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_delta = self.delta_weight()
            self.base_layer.weight.add_(self._merged_delta)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self._merged_delta is not None:
            self.base_layer.weight.sub_(self._merged_delta)
            self._merged_delta = None
            self.merged = False

    def lora_view(self) -> LoRAFactors:
        """peft's DoRA over the original W: the factors (PiSSA's rank-2r form gives the same W + s·ΔBA)
        plus the magnitude, which rescales W itself (``peft_options`` says ``use_dora``)."""
        factors = super().lora_view()
        factors.extra = {"lora_magnitude_vector.weight": self.lora_magnitude_vector.weight}
        return factors


def lora_targets(model: nn.Module, cfg: Any, exclude: Sequence[str] = ()) -> list[str]:
    """``cfg.target_modules`` resolved (as peft does), each checked to be larger than ``cfg.r``."""
    targets = match_targets(model, cfg.target_modules, exclude)
    check_rank_fits(model, targets, cfg.r)
    return targets


class LoRAShaped(AdapterMethod, SwitchesOff):
    """A base for methods whose layers are LoRA-shaped (LoRA itself, DyLoRA, SoRA): targets resolved and checked
    against r, and the peft form is a plain LoRA."""

    schema: ClassVar[type[AdapterSchema]] = LoRACoreSchema

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        return lora_targets(model, self.cfg, exclude)

    def peft_options(self) -> dict[str, Any]:
        return {"lora_dropout": self.cfg.dropout}


class LoRABase(LoRAShaped):
    """LoRA layers with ``scaling`` and ``bias`` (LoRA, QLoRA, LQ-LoRA, Block-LoRA)."""

    schema: ClassVar[type[AdapterSchema]] = LoRABaseSchema

    def make_layer(self, base_layer: nn.Linear) -> LoRALinear:
        c = self.cfg
        return LoRALinear(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, scaling=c.scaling)

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        """LoRA's injection, then the biases ``bias`` names train too (all, or those of the targets)."""
        injection = super().apply(model, head_modules)
        if self.cfg.bias != "none":
            for name, p in model.named_parameters():
                is_bias = name.endswith(".bias") or name == "bias"
                if is_bias and (self.cfg.bias == "all" or name.rsplit(".", 2)[0] in injection.targets):
                    p.requires_grad_(True)
        return injection

    def peft_options(self) -> dict[str, Any]:
        return {**super().peft_options(), "use_rslora": self.cfg.scaling == "rslora", "bias": self.cfg.bias}

    def switch_off_refusal(self) -> str | None:
        if self.cfg.bias == "none":
            return None
        return (f"adapter.bias={self.cfg.bias} trains the base model's biases, which switching the adapter off "
                "does not undo: no reference model (set adapter.bias=none, or use loss=simpo or loss=orpo)")


@register_adapter
class LoRA(LoRABase):
    name = "lora"
    schema: ClassVar[type[AdapterSchema]] = LoRASchema

    def make_layer(self, base_layer: nn.Linear) -> LoRALinear:
        c = self.cfg
        layer = DoRALinear if c.variant == "dora" else LoRALinear
        return layer(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, scaling=c.scaling, init=c.init)

    def peft_options(self) -> dict[str, Any]:
        return {**super().peft_options(), "use_dora": self.cfg.variant == "dora"}
