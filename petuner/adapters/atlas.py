"""aTLAS: task vectors composed with learned anisotropic scaling (Zhang et al., "Knowledge Composition using Task
Vectors with Learned Anisotropic Scaling", NeurIPS 2024), over earlier petuner runs.

``adapter=atlas adapter.sources=[RUN_A, RUN_B, ...]``: each source run's update of each adapted matrix (its task
vector, frozen) gets its own trained coefficient: ΔW = Σ_i λ_{i,block} ΔW_i, one λ per parameter block (adapted
matrix) per source — the paper's anisotropic scaling, a few hundred numbers. ``lora_r > 0`` also trains a plain
LoRA beside them (s = lora_alpha / lora_r). λ starts at ``init`` (default 1/number of sources: the plain average
of the task vectors, so training starts from that merge).

Each source's update is held as factors (B_i, A_i) with its scale folded into B_i: a LoRA source's own factors,
an exact SVD of any other method's ΔW. The layer keeps them concatenated (A: Σr_i × in, B: out × Σr_i) as
buffers saved with the run, so a reload needs no source folder: their ranks go to run.json (``report``) and come
back through ``restore``. Reading the sources is the caller's (``ComposesRuns``: ``petuner.run`` reads them,
checked to share this run's base). The update is a LoRA — A = [A_1; …; A_n; A_lora], B = [λ_1 B_1, …, λ_n B_n,
s·B_lora] — so aTLAS exports, merges and converts exactly like LoRA. With no sources read (``sources: []``) it is
the plain LoRA beside alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterLayer, AdapterMethod, AdapterSchema, LoRAFactors
from petuner.adapters.capabilities import ComposesRuns
from petuner.adapters.lora import check_target_modules
from petuner.adapters.registry import register_adapter
from petuner.adapters.targets import match_targets
from petuner.errors import ConfigError
from petuner.schema import checked, items, number


def check_sources(cfg: Any, key: str, group: str) -> None:
    sources = list(cfg.get(key) or [])
    if not all(isinstance(s, str) and s for s in sources):
        raise ConfigError(f"{group}.{key}={sources!r}: a list of run folders (the runs whose updates compose)")


@dataclass
class AtlasSchema(AdapterSchema):
    name: str = "atlas"
    sources: list[str] = items(list, check_sources)  # run folders on this run's base
    target_modules: Any = checked("all-linear", check_target_modules)  # which of the sources' modules to compose
    init: Any = number(None, strict=False, optional=True, low=-math.inf)  # λ's start (null: 1/number of sources)
    lora_r: int = number(0, integer=True, strict=False)  # a LoRA trained beside the coefficients (0: none)
    lora_alpha: float = number(16.0)


class AtlasLinear(AdapterLayer):
    """A frozen base, n frozen task vectors (concatenated factors), their n coefficients, an optional LoRA."""

    def __init__(self, base_layer: nn.Linear, ranks: Sequence[int], init: float, lora_r: int, lora_alpha: float):
        super().__init__(base_layer)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.ranks = list(ranks)
        self.register_buffer("task_A", torch.zeros(sum(ranks), base_layer.in_features, **factory))
        self.register_buffer("task_B", torch.zeros(base_layer.out_features, sum(ranks), **factory))
        self.coefficients = nn.Parameter(torch.full((len(ranks),), float(init), **factory)) if ranks else None
        self.lora_scaling = lora_alpha / lora_r if lora_r else 0.0
        self.lora_A = nn.Linear(base_layer.in_features, lora_r, bias=False, **factory) if lora_r else None
        self.lora_B = nn.Linear(lora_r, base_layer.out_features, bias=False, **factory) if lora_r else None
        if lora_r:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def set_sources(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.task_A.copy_(a)
        self.task_B.copy_(b)

    def scaled_task_B(self) -> torch.Tensor:
        """[λ_1 B_1, …, λ_n B_n]: each source's columns times its coefficient."""
        if self.coefficients is None:
            return self.task_B
        scale = torch.repeat_interleave(self.coefficients, torch.tensor(self.ranks, device=self.task_B.device))
        return self.task_B * scale

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.task_A.dtype)
        out = (x @ self.task_A.T) @ self.scaled_task_B().T
        if self.lora_A is not None:
            out = out + self.lora_B(self.lora_A(x) * self.lora_scaling)
        return out

    def lora_view(self) -> LoRAFactors:
        a, b = self.task_A, self.scaled_task_B()
        if self.lora_A is not None:
            a, b = torch.cat([a, self.lora_A.weight]), torch.cat([b, self.lora_scaling * self.lora_B.weight], dim=1)
        return LoRAFactors(A=a, B=b, scaling=1.0)

    def delta_weight(self) -> torch.Tensor:
        view = self.lora_view()
        return view.B @ view.A


@register_adapter
class Atlas(AdapterMethod, ComposesRuns):
    name = "atlas"
    schema: ClassVar[type[AdapterSchema]] = AtlasSchema

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._ranks: dict[str, list[int]] = {}  # module -> each source's rank there (0: the source leaves it)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def sources(self) -> list[str]:
        return list(self.cfg.sources)

    def compose(self, updates: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Each source's (A, B) per module, scale folded into B (``petuner.merge.read_sources`` gives them)."""
        modules = list(dict.fromkeys(name for source in updates for name in source))
        for name in modules:
            present = [source[name] for source in updates if name in source]
            shape_a, shape_b = present[0][0].shape[1:], present[0][1].shape[:1]
            pairs = [source.get(name, (torch.zeros(0, *shape_a), torch.zeros(*shape_b, 0))) for source in updates]
            self._ranks[name] = [a.shape[0] for a, _ in pairs]
            self._factors[name] = (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1))

    def report(self) -> dict[str, Any]:
        return {"sources": self.sources(), "ranks": self._ranks}

    def restore(self, report: dict[str, Any]) -> None:
        self._ranks = {name: list(ranks) for name, ranks in (report.get("ranks") or {}).items()}

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        wanted = match_targets(model, self.cfg.target_modules, exclude)
        if not self._ranks:  # no sources read: the LoRA beside, on the targets
            if not self.cfg.lora_r:
                raise ConfigError("adapter=atlas has nothing to train: name the runs to compose, "
                                  "adapter.sources=[RUN_A,RUN_B] (or set adapter.lora_r)")
            return wanted
        chosen = [name for name in wanted if name in self._ranks]
        if not chosen:
            raise ConfigError(f"adapter.target_modules={self.cfg.target_modules!r} keeps none of the modules the "
                              f"sources adapted ({', '.join(sorted(self._ranks))})")
        return chosen

    def make_named_layer(self, name: str, base_layer: nn.Linear) -> AtlasLinear:
        ranks = self._ranks.get(name, [])
        init = self.cfg.init if self.cfg.init is not None else 1.0 / max(len(ranks), 1)
        layer = AtlasLinear(base_layer, ranks, init, self.cfg.lora_r, self.cfg.lora_alpha)
        if name in self._factors:
            layer.set_sources(*self._factors[name])
        return layer

    def peft_options(self) -> dict[str, Any]:
        return {}  # a plain LoRA at scale 1 (the export fits r and lora_alpha to the factors)
