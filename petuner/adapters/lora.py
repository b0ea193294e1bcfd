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
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from petuner.adapters.base import (
    AdapterLayer,
    AdapterMethod,
    LoRAFactors,
    check_rank_fits,
    match_targets,
)
from petuner.adapters.registry import register_adapter
from petuner.checks import check_number
from petuner.errors import ConfigError

SCALINGS = ("standard", "rslora")
BIASES = ("none", "all", "lora_only")
INITS = ("kaiming", "gaussian", "pissa")
VARIANTS = ("standard", "dora")
# The options every LoRA-shaped method shares; ``adapter=lora`` adds ``init`` and ``variant``.
LORA_OPTIONS = ("r", "alpha", "dropout", "target_modules", "scaling", "bias")


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
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def factors(self) -> LoRAFactors:
        """The update relative to the original base weight (PiSSA: rank 2r, its initial part subtracted)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.pissa:
            a, b = torch.cat([a, self.pissa_A0]), torch.cat([b, -self.pissa_B0], dim=1)
        return LoRAFactors(A=a, B=b, scaling=self.scaling)

    def as_lora(self) -> LoRAFactors | None:
        return self.factors()


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

    def as_lora(self) -> LoRAFactors | None:
        return None  # not a LoRA: the magnitude rescales W itself

    def peft_lora(self) -> LoRAFactors:
        """peft's DoRA over the original W: the factors (PiSSA's rank-2r form gives the same W + s·ΔBA)
        plus the magnitude."""
        factors = self.factors()
        factors.extra = {"lora_magnitude_vector.weight": self.lora_magnitude_vector.weight}
        return factors


def lora_targets(model: nn.Module, cfg: Any, exclude: Sequence[str] = ()) -> list[str]:
    """``cfg.target_modules`` resolved (as peft does), each checked to be larger than ``cfg.r``."""
    targets = match_targets(model, cfg.target_modules, exclude)
    check_rank_fits(model, targets, cfg.r)
    return targets


def lora_peft_config(cfg: Any, targets: Sequence[str], task_type: str, head_modules: Sequence[str],
                     base_model_name_or_path: str | None, **extra: Any) -> Any:
    """peft's ``LoraConfig`` for a LoRA-shaped adapter (the export may then set per-layer ranks)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets),
                      modules_to_save=list(head_modules) or None, task_type=task_type,
                      base_model_name_or_path=base_model_name_or_path, **extra)


class LoRAShaped(AdapterMethod):
    """A base for methods whose layers are LoRA-shaped (LoRA itself, DyLoRA, SoRA): the shared options r, alpha,
    dropout and target_modules are checked, targets resolved, and the peft form is a plain LoRA."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        check_lora_cfg(self.cfg)

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        return lora_targets(model, self.cfg, exclude)

    def peft_config(self, targets: Sequence[str], task: str, head_modules: Sequence[str],
                    base_model_name_or_path: str | None) -> Any:
        """A plain LoRA; the export fits r and alpha (per layer if need be) to the layers' factors."""
        return lora_peft_config(self.cfg, targets, self.peft_task_types[task], head_modules, base_model_name_or_path)


def check_lora_cfg(cfg: Any) -> None:
    """The checks every LoRA-shaped method shares: r, alpha, dropout, and scaling and bias where offered."""
    check_number(cfg, "r", "adapter", integer=True)
    check_number(cfg, "alpha", "adapter")
    check_number(cfg, "dropout", "adapter", strict=False, below=1)
    if "scaling" in cfg and cfg.scaling not in SCALINGS:
        raise ConfigError(f"adapter.scaling={cfg.scaling!r}: allowed: {', '.join(SCALINGS)}")
    if "bias" in cfg and cfg.bias not in BIASES:
        raise ConfigError(f"adapter.bias={cfg.bias!r}: allowed: {', '.join(BIASES)}")


@register_adapter
class LoRA(LoRAShaped):
    name = "lora"
    options: ClassVar[tuple[str, ...]] = (*LORA_OPTIONS, "init", "variant")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if self.init not in INITS:
            raise ConfigError(f"adapter.init={self.init!r}: allowed: {', '.join(INITS)}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"adapter.variant={self.variant!r}: allowed: {', '.join(VARIANTS)}")

    # Optional keys: methods built on LoRA (qlora, block_lora) do not offer them.
    @property
    def init(self) -> str:
        return self.cfg.get("init", "kaiming")

    @property
    def variant(self) -> str:
        return self.cfg.get("variant", "standard")

    def make_layer(self, base_layer: nn.Linear) -> LoRALinear:
        c = self.cfg
        layer = DoRALinear if self.variant == "dora" else LoRALinear
        return layer(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, scaling=c.scaling, init=self.init)

    def extra_trainable(self, model: nn.Module, targets: Sequence[str]) -> list[str]:
        names = [n for n, _ in model.named_parameters() if n.endswith(".bias") or n == "bias"]
        if self.cfg.bias == "all":
            return names
        if self.cfg.bias == "lora_only":
            return [n for n in names if n.rsplit(".", 2)[0] in targets]
        return []

    def peft_config(self, targets: Sequence[str], task: str, head_modules: Sequence[str],
                    base_model_name_or_path: str | None) -> Any:
        c = self.cfg
        return lora_peft_config(c, targets, self.peft_task_types[task], head_modules, base_model_name_or_path,
                                use_rslora=c.scaling == "rslora", use_dora=self.variant == "dora", bias=c.bias)
