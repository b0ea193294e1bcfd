"""DyLoRA (Valipour et al., EACL 2023): one adapter trained for every rank 1..r at once.

Each optimizer step draws one rank b (shared by all layers) and runs the forward with A[:b], B[:, :b]
at scale alpha/b — the scale a rank-b LoRA with the same alpha has; a wrong scale silently ruins the
low ranks. Modes:

- ``frozen`` (the paper's): only component b-1 (row b-1 of A, column b-1 of B) is updated that step.
  Components 0..b-2 are detached, and because a zero gradient is not a frozen parameter (AdamW's
  momentum and weight decay still move a row without gradient), every other component and its
  optimizer state (Adam's moments) are put back after the optimizer step: they are exactly unchanged.
  Adam's step count is per tensor, so a row's bias correction counts every step, trained or not.
- ``frozen_reference``: the reference code's form: components 0..b-2 detached, nothing put back, so the
  optimizer's momentum and weight decay still move every row.
- ``unfrozen``: all of [:b] get gradient (the optimizer moves the rest as in ``frozen_reference``).

Outside training steps every layer
runs at full rank r unless ``set_rank`` chose another; a rank-b truncation is a plain rank-b LoRA
(``lora_view``), which is how it exports.

The draw uses a private generator seeded from the run's seeded RNG when hooks are built; its state is
part of the hook's ``state_dict``, so a resumed run draws exactly the ranks the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.adapters.base import (
    AdapterSchema,
    LoRAFactors,
    adapter_layers,
)
from petuner.adapters.capabilities import RankDynamic
from petuner.adapters.lora import LoRACoreSchema, LoRALinear, LoRAShaped
from petuner.adapters.registry import register_adapter
from petuner.errors import ConfigError, PetunerError
from petuner.schema import choice, flag
from petuner.train.hooks import Hook, TrainState

MODES = ("frozen", "frozen_reference", "unfrozen")
DETACHED_MODES = ("frozen", "frozen_reference")


class DyLoRALinear(LoRALinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 mode: str = "frozen") -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout)
        self.alpha = alpha
        self.mode = mode
        self.active_rank = r
        self.training_step = False  # True between a rank draw and the optimizer step

    # The scale follows the active rank: alpha / b. (LoRALinear.__init__ assigns alpha / r; ignored.)
    @property
    def scaling(self) -> float:  # type: ignore[override]
        return self.alpha / self.active_rank

    @scaling.setter
    def scaling(self, value: float) -> None:
        pass

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:b] and B[:, :b] at the active rank b; in the frozen modes' training steps only row/column b-1 is live."""
        b = self.active_rank
        a, bm = self.lora_A.weight[:b], self.lora_B.weight[:, :b]
        if self.mode in DETACHED_MODES and self.training_step and b > 1:
            a = torch.cat([a[:-1].detach(), a[-1:]], dim=0)
            bm = torch.cat([bm[:, :-1].detach(), bm[:, -1:]], dim=1)
        return a, bm

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.active_factors()
        x = self.lora_dropout(x.to(a.dtype))
        return (x @ a.T * self.scaling) @ b.T  # s on the r-wide intermediate, as LoRALinear

    def delta_weight(self) -> torch.Tensor:
        a, b = self.active_factors()
        return (b @ a) * self.scaling

    def lora_view(self) -> LoRAFactors:
        """The rank-b truncation at the active rank b: a plain rank-b LoRA at scale alpha/b."""
        b = self.active_rank
        return LoRAFactors(A=self.lora_A.weight[:b], B=self.lora_B.weight[:, :b], scaling=self.scaling)


class RankDraw(Hook):
    """Draws the step's rank before its forward passes; restores full rank after the optimizer step.

    In ``frozen`` mode it also keeps every component but b-1 exactly as it was (``FrozenComponents``).
    """

    def __init__(self, model: nn.Module, r: int, weights: Sequence[float] | None, mode: str) -> None:
        self.model = model
        self.layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, DyLoRALinear)]
        self.r = r
        self.weights = torch.tensor(weights if weights is not None else [1.0] * r, dtype=torch.float64)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the run's seeded global RNG
        self.generator = torch.Generator().manual_seed(seed)
        self.frozen = FrozenComponents(self.layers) if mode == "frozen" else None
        self.rank = r

    def draw(self) -> int:
        return int(torch.multinomial(self.weights, 1, generator=self.generator).item()) + 1

    def set_layers(self, rank: int, training_step: bool) -> None:
        for layer in self.layers:
            layer.active_rank = rank
            layer.training_step = training_step

    def before_step(self, state: TrainState) -> None:
        self.rank = self.draw()
        self.set_layers(self.rank, training_step=True)
        state.metrics["dylora/rank"] = self.rank

    def after_backward(self, state: TrainState) -> None:
        if self.frozen is not None:
            self.frozen.save(state.optimizer)

    def after_optimizer_step(self, state: TrainState) -> None:
        if self.frozen is not None:
            self.frozen.restore(state.optimizer, trained=self.rank - 1)
        self.set_layers(self.r, training_step=False)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class FrozenComponents:
    """Puts every component but the trained one back after the optimizer step, with its optimizer state.

    Detaching components 0..b-2 only zeroes their gradient; AdamW's momentum and weight decay would still
    move them (and decay their moments). Saving A's rows and B's columns (and every optimizer state tensor
    shaped like them) before the step and writing all but index b-1 back after it leaves them exactly
    unchanged, whatever the optimizer, as long as its state is per element.
    """

    def __init__(self, layers: Sequence[DyLoRALinear]) -> None:
        # (parameter, the dimension indexing its components): A's rows, B's columns
        self.params = [(p, dim) for layer in layers for p, dim in ((layer.lora_A.weight, 0), (layer.lora_B.weight, 1))]
        self.saved: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    @torch.no_grad()
    def save(self, optimizer: torch.optim.Optimizer) -> None:
        self.saved = [(p.detach().clone(), {k: v.clone() for k, v in self.state_of(optimizer, p).items()})
                      for p, _ in self.params]

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer, trained: int) -> None:
        for (p, dim), (value, moments) in zip(self.params, self.saved, strict=True):
            keep = torch.ones(p.shape[dim], dtype=torch.bool, device=p.device)
            keep[trained] = False
            state = self.state_of(optimizer, p)
            for target, source in ((p, value), *((state[k], v) for k, v in moments.items() if k in state)):
                if dim == 0:
                    target[keep] = source[keep]
                else:
                    target[:, keep] = source[:, keep]
        self.saved = []

    @staticmethod
    def state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimizer's per-element state tensors of ``p``; an error for state that is not per element."""
        state = {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.numel() > 1}
        for key, value in state.items():
            if value.shape != p.shape:
                raise PetunerError(f"adapter.mode=frozen: the optimizer's state {key!r} {tuple(value.shape)} is not "
                                   f"one value per weight {tuple(p.shape)}, so the rows of other ranks cannot be "
                                   "kept unchanged; use an optimizer with per-element state (adamw, sgd) or "
                                   "adapter.mode=frozen_reference")
        return state


class RankSweepOnEval(Hook):
    """Optionally evaluates every rank 1..r at each evaluation (``adapter.eval_all_ranks``)."""

    def __init__(self, method: RankDynamic, model: nn.Module) -> None:
        self.method, self.model = method, model

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        assert state.evaluate is not None
        for rank in self.method.ranks()[:-1]:  # full rank r is the evaluation just made
            self.method.set_rank(self.model, rank)
            metrics.update({f"{k}@r{rank}": v for k, v in state.evaluate().items()})
        self.method.set_rank(self.model, self.method.ranks()[-1])


@dataclass
class DyLoRASchema(LoRACoreSchema):
    name: str = "dylora"
    mode: str = choice("frozen", MODES)
    rank_weights: list[float] | None = None  # null: b ~ Uniform{1..r}; or r non-negative weights
    eval_all_ranks: bool = flag(False)


@register_adapter
class DyLoRA(LoRAShaped, RankDynamic):
    name = "dylora"
    schema: ClassVar[type[AdapterSchema]] = DyLoRASchema

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        weights = c.rank_weights
        if weights is not None:
            values = list(weights)
            if len(values) != c.r or any(not isinstance(w, (int, float)) or w < 0 for w in values) or not any(values):
                raise ConfigError(f"adapter.rank_weights={values!r}: must be {c.r} non-negative numbers "
                                  "(one per rank 1..r, not all zero), or null for uniform")

    def make_layer(self, base_layer: nn.Linear) -> DyLoRALinear:
        c = self.cfg
        return DyLoRALinear(base_layer, r=c.r, alpha=c.alpha, dropout=c.dropout, mode=c.mode)

    def hooks(self, model: nn.Module) -> list[Hook]:
        hooks: list[Hook] = [RankDraw(model, self.cfg.r, self.cfg.rank_weights, self.cfg.mode)]
        if self.cfg.eval_all_ranks:
            hooks.append(RankSweepOnEval(self, model))
        return hooks

    def ranks(self) -> list[int]:
        return list(range(1, self.cfg.r + 1))

    def set_rank(self, model: nn.Module, rank: int) -> None:
        if rank not in self.ranks():
            raise ConfigError(f"rank {rank} is out of range for this DyLoRA adapter; allowed: 1..{self.cfg.r}")
        for _, layer in adapter_layers(model):
            assert isinstance(layer, DyLoRALinear)
            if layer.merged:
                raise ConfigError("cannot change the rank of a merged DyLoRA layer; unmerge first")
            layer.active_rank = rank
