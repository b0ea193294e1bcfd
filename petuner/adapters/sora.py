"""SoRA (Ding et al., EMNLP 2023): LoRA with a gate between A and B, sparsified by a proximal step.

    y = W x + s · B (g ⊙ (A x)),   g ∈ R^r,   s = alpha / r

The gate g is excluded from the main optimizer (and so from weight decay); after every optimizer
step a hook updates it on its own: a gradient step (SGD or Adam at ``gate_lr`` times the main schedule's
factor, so the gates warm up and decay with the rest as in the reference training script), then the textbook
proximal operator of an L1 penalty ξ‖g‖₁, the soft-threshold g ← sign(g)·max(|g| − lr·ξ, 0).
The reference code instead applies three masked updates in sequence (zeroing every |g| < 2ξ) and
does not scale ξ by the learning rate; with the textbook operator, ξ is the L1 weight itself, so
useful values are larger than the reference script's (e.g. ξ ≈ 0.1–1 with gate_lr ≈ 1e-3..1e-2).
ξ can rise over training (``xi_schedule``), tracing a curve of retained rank against quality that
the hook writes to ``RUN_DIR/sora_curve.{json,md}`` at each evaluation.

A gate entry that is exactly zero removes its rank: ``lora_view`` drops those ranks and folds g into B,
so the export is a plain LoRA whose rank differs per layer (peft's ``rank_pattern``) with the same
outputs as the gated model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.adapters.base import (
    AdapterSchema,
    LoRAFactors,
    adapter_layers,
)
from petuner.adapters.capabilities import OwnsOptimizerParameters
from petuner.adapters.lora import LoRACoreSchema, LoRALinear, LoRAShaped
from petuner.adapters.registry import register_adapter
from petuner.errors import ConfigError
from petuner.io import atomic_write_json, atomic_write_text
from petuner.report import markdown_table
from petuner.schema import choice, number
from petuner.train.hooks import Hook, TrainState

GATE_INITS = ("ones", "randn")
GATE_OPTIMIZERS = ("sgd", "adam")
XI_SCHEDULES = ("constant", "linear", "step")


def soft_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of threshold·‖x‖₁."""
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0.0)


class SoRALinear(LoRALinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 gate_init: str = "ones") -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout)
        weight = base_layer.weight
        init = torch.ones if gate_init == "ones" else torch.randn
        self.gate = nn.Parameter(init(r, device=weight.device, dtype=weight.dtype))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x) * (self.gate * self.scaling))  # r-wide, as LoRALinear

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight * self.gate) @ self.lora_A.weight * self.scaling

    def nonzero_ranks(self) -> int:
        return int(torch.count_nonzero(self.gate))

    def lora_view(self) -> LoRAFactors:
        keep = self.gate != 0
        return LoRAFactors(A=self.lora_A.weight[keep], B=self.lora_B.weight[:, keep] * self.gate[keep],
                           scaling=self.scaling)


def xi_at(cfg: Any, index: int, max_steps: int) -> float:
    """The sparsity weight ξ of the step with 0-based ``index``: constant, or rising from xi to xi_final.

    ``linear`` reaches xi_final at the last step; ``step`` splits training into xi_steps equal stages
    xi, …, xi_final, so that every stage, the last included, trains for max_steps / xi_steps steps.
    """
    if cfg.xi_schedule == "constant":
        return float(cfg.xi)
    if cfg.xi_schedule == "step":
        stage = min(index * cfg.xi_steps // max(max_steps, 1), cfg.xi_steps - 1)
        progress = stage / (cfg.xi_steps - 1)
    else:
        progress = min(index / max(max_steps - 1, 1), 1.0)
    return float(cfg.xi + (cfg.xi_final - cfg.xi) * progress)


def schedule_factor(optimizer: torch.optim.Optimizer | None) -> float:
    """The main schedule's current multiplier (lr / initial lr of the main optimizer's first group), so
    the gates warm up and decay with everything else, as in the reference training script."""
    if optimizer is None:
        return 1.0
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0


class ProximalGateStep(Hook):
    """The gates' own optimizer: a gradient step at gate_lr·(the main schedule's factor at this step), then
    soft-thresholding by that learning rate times ξ."""

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        self.cfg = cfg
        self.layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, SoRALinear)]
        gates = [layer.gate for layer in self.layers]
        optimizer = torch.optim.SGD if cfg.gate_optimizer == "sgd" else torch.optim.Adam
        self.optimizer = optimizer(gates, lr=cfg.gate_lr)
        self.curve: list[dict[str, float]] = []
        self.lr_factor = 1.0

    def after_backward(self, state: TrainState) -> None:
        self.lr_factor = schedule_factor(state.optimizer)  # before the scheduler moves on to the next step

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]  # the loop unscales the gates' gradients under fp16 loss scaling

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.skip_update:  # a non-finite or scaler-overflowing step: the gates do not move either
            return
        xi = xi_at(self.cfg, state.step - 1, state.max_steps)
        lr = self.cfg.gate_lr * self.lr_factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for layer in self.layers:
                layer.gate.copy_(soft_threshold(layer.gate, lr * xi))
        state.metrics["sora/xi"] = xi
        state.metrics["sora/gate_lr"] = lr

    def nonzero_ranks(self) -> int:
        return sum(layer.nonzero_ranks() for layer in self.layers)

    def retained_parameters(self) -> int:
        return sum(layer.nonzero_ranks() * (layer.in_features + layer.out_features) for layer in self.layers)

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        metrics["sora/nonzero_ranks"] = self.nonzero_ranks()
        metrics["sora/retained_parameters"] = self.retained_parameters()
        self.curve = [p for p in self.curve if p["step"] < state.step]
        self.curve.append({"step": state.step, "xi": xi_at(self.cfg, max(state.step - 1, 0), state.max_steps),
                           "total_ranks": self.cfg.r * len(self.layers), **metrics})
        if state.run_dir is not None:
            self.write_curve(state)

    def write_curve(self, state: TrainState) -> None:
        assert state.run_dir is not None
        atomic_write_json(state.run_dir / "sora_curve.json", self.curve)
        keys = [k for k in self.curve[-1] if k.startswith("eval/")]
        rows = [[p["step"], f"{p['xi']:.3g}", f"{p['sora/nonzero_ranks']} / {p['total_ranks']}",
                 f"{p['sora/retained_parameters']:,}", *(f"{p[k]:.4f}" for k in keys)] for p in self.curve]
        headers = ["step", "ξ", "non-zero ranks", "retained params", *keys]
        atomic_write_text(state.run_dir / "sora_curve.md", markdown_table(headers, rows, numeric=[True] * len(headers)))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "curve": self.curve}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.curve = list(state["curve"])


@dataclass
class SoRASchema(LoRACoreSchema):
    name: str = "sora"
    gate_init: str = choice("ones", GATE_INITS)
    gate_optimizer: str = choice("sgd", GATE_OPTIMIZERS)  # the gates' own optimizer before soft-thresholding
    gate_lr: float = number(1.0e-2)
    xi: float = number(0.5, strict=False)  # L1 weight ξ (threshold gate_lr·ξ per step)
    xi_schedule: str = choice("constant", XI_SCHEDULES)
    xi_final: float = number(2.0, strict=False)  # linear/step schedules rise from xi to xi_final
    xi_steps: int = number(4, integer=True)  # stairs of the step schedule


@register_adapter
class SoRA(LoRAShaped, OwnsOptimizerParameters):
    name = "sora"
    schema: ClassVar[type[AdapterSchema]] = SoRASchema

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        if c.xi_schedule == "step" and c.xi_steps < 2:
            raise ConfigError(f"adapter.xi_steps={c.xi_steps!r}: the step schedule needs at least 2 stages "
                              "(xi, then xi_final); use xi_schedule=constant for one")

    def make_layer(self, base_layer: nn.Linear) -> SoRALinear:
        c = self.cfg
        return SoRALinear(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, gate_init=c.gate_init)

    def own_optimizer_parameters(self, model: nn.Module) -> list[str]:
        return [f"{name}.gate" for name, layer in adapter_layers(model) if isinstance(layer, SoRALinear)]

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [ProximalGateStep(self.cfg, model)]
