"""GaLore (Zhao et al., ICML 2024): Adam whose state lives in a rank-r subspace of each matrix's gradient.

For every parameter of a group with a ``rank``, every ``update_proj_gap`` steps (from step 0) the
projector P is recomputed from the current gradient (``petuner.optim.projectors``); the gradient is
projected, Adam runs on the projection (moments are NOT re-projected when P changes, as in the paper),
the normalized update is projected back and multiplied by ``scale``. Groups without a rank are plain
AdamW. Weight decay is decoupled and applied to W itself, before the update (Loshchilov & Hutter;
torch's AdamW order; the galore-torch reference decays after the update instead).

The Adam arithmetic is the paper's efficient form, as in galore-torch's ``GaLoreAdamW``:
``p -= lr·sqrt(1-β2ᵗ)/(1-β1ᵗ) · m / (sqrt(v) + eps)``, so GaLore with the exact projector matches
the reference. ``quantize=True`` keeps moments 8-bit (``petuner.optim.blockwise``) — GaLore-8bit.

Why petuner's own: galore-torch 1.0 calls ``torch.cuda.synchronize`` unconditionally in its 8-bit
optimizer, keeps projectors as Python objects (not in ``state_dict``, so a resume refreshes them at
the wrong time) and has neither randomized nor DCT projectors.

``per_layer=True`` applies each parameter's update in a post-accumulate-grad hook during backward
and frees its gradient at once (gradient memory: one matrix, not the model). Gradient clipping,
gradient accumulation and fp16 loss scaling cannot work then; ``check_optimizer_for_trainer`` refuses
those combinations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from petuner.optim import projectors as proj
from petuner.optim.blockwise import DynamicMaps, init_moments, load_moments, store_moments

SEED_STRIDE = 1_000_003  # randomized projector seed = index + stride · step: distinct per (param, refresh)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for groups that set ``rank``; 8-bit moments if ``quantize``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, quantize: bool = False, min_8bit_size: int = 4096,
                 per_layer: bool = False) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": None,
                    "update_proj_gap": 200, "scale": 1.0, "projector": "svd"}
        super().__init__(params, defaults)
        self.quantize, self.min_8bit_size = quantize, min_8bit_size
        self.maps = DynamicMaps()
        self._dct: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._index = {p: i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        self._group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        if per_layer:
            for group in self.param_groups:
                for p in group["params"]:
                    p.register_post_accumulate_grad_hook(self._per_layer_step)

    # --- what the memory report counts besides ``state`` ------------------------------------------

    def extra_state_tensors(self) -> list[torch.Tensor]:
        """Tensors the optimizer holds outside ``state``: the cached DCT bases and dynamic maps."""
        return [*self._dct.values(), *self.maps.tensors()]

    # --- the update -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    @torch.no_grad()
    def _per_layer_step(self, p: torch.Tensor) -> None:
        self._update(p, self.param_groups[self._group_of[p]])
        p.grad = None

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
        grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()  # the update runs in fp32
        rank = group["rank"]
        if rank is not None:
            if state["step"] % group["update_proj_gap"] == 0:
                self._refresh_projector(p, group, state)
            projector = self._projector(p, group, state)
            grad = proj.project(grad, projector)
        if "exp_avg" not in state:
            init_moments(state, grad, self.quantize and grad.numel() >= self.min_8bit_size)
        exp_avg, exp_avg_sq = load_moments(state, self.maps)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        store_moments(state, (exp_avg, exp_avg_sq), self.maps)
        if rank is not None:
            update = proj.project_back(update, projector, p.shape) * group["scale"]
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-step_size)

    # --- projectors: ``projector`` (a matrix) or ``projector_index`` (DCT columns) in the state ---

    def _refresh_projector(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        grad, rank = p.grad.float(), group["rank"]
        if group["projector"] == "svd":
            state["projector"] = proj.svd_projector(grad, rank)
        elif group["projector"] == "randomized":
            state["projector"] = proj.randomized_projector(grad, rank, self._index[p] + SEED_STRIDE * state["step"])
        else:
            state["projector_index"] = proj.dct_indices(grad, self._basis(p), rank)

    def _projector(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> torch.Tensor:
        if group["projector"] == "dct":
            return proj.dct_projector(self._basis(p), state["projector_index"], p.shape)
        return state["projector"]

    def _basis(self, p: torch.Tensor) -> torch.Tensor:
        """The DCT basis in fp32 whatever the weight's dtype: projections feed the fp32 Adam update."""
        n = min(p.shape)
        key = (n, p.device, torch.float32)
        if key not in self._dct:
            self._dct[key] = proj.dct_basis(n, p.device, torch.float32)
        return self._dct[key]

    # --- resume: every saved tensor as saved (torch would cast it to the param's dtype: uint8 codes,
    # --- projector indices above 256 and fp32 moments of a bf16 weight would all lose values) -------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        saved = {p: {k: v for k, v in state_dict["state"].get(i, {}).items() if torch.is_tensor(v)}
                 for i, p in zip(saved_ids, params, strict=True)}
        super().load_state_dict(state_dict)
        for p, tensors in saved.items():
            for key, tensor in tensors.items():
                self.state[p][key] = tensor.to(p.device)
