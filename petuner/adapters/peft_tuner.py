"""``adapter=peft``: any of peft's tuners (LoHa, LoKr, AdaLoRA, VeRA, IA3, OFT, MiSS, ...) in petuner's loop.

The config names a peft type and the keyword arguments of its config class, e.g.
``adapter.peft_type=LOHA adapter.config={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}``.
peft's own tuner class injects its own layers in place (no ``PeftModel`` wrapper, so module names
stay the base model's) and marks what trains; each injected layer is then wrapped in a ``PeftLayer``,
which gives petuner's merge, unmerge, disable, unload and save/load to peft's layer through peft's own
``merge``/``unmerge``/``enable_adapters``. The peft export rebuilds a ``PeftModel`` on a fresh base,
copies the trained layers in and calls peft's ``save_pretrained``; the merged export folds each layer
with peft's ``merge``, as ``merge_and_unload`` does.

AdaLoRA needs two things peft leaves to the training loop, given here without the loop knowing:
``update_and_allocate`` after every optimizer step (``AdaLoRAHook``; ``total_step`` defaults to the
run's step count) and the orthogonal regularizer that ``AdaLoraModel.forward`` adds to the loss
(a forward hook on the model, as petuner calls the model directly).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from torch import nn

from petuner.adapters.base import (
    AdapterLayer,
    AdapterMethod,
    AdapterSchema,
    Injection,
    adapter_layers,
    set_submodule,
)
from petuner.adapters.capabilities import PeftNative, SwitchesOff
from petuner.adapters.conv1d import refuse_conv1d
from petuner.adapters.peft_form import PEFT_TASK_TYPES
from petuner.adapters.registry import register_adapter
from petuner.adapters.targets import match_parameters, match_targets
from petuner.errors import ConfigError, first_line
from petuner.families import default_targets
from petuner.schema import checked, items
from petuner.train.hooks import Hook, TrainState

log = logging.getLogger(__name__)
ADAPTER = "default"  # peft's adapter name


# peft's LyCORIS tuners build their layers for nn.Linear and nn.Conv2d only (peft.tuners.lycoris_utils).
NO_CONV1D = ("LOHA", "LOKR")


def peft_types() -> list[str]:
    """peft types whose tuner injects layers (prompt learning and adaption prompt are out of scope)."""
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return sorted(t.value for t in PEFT_TYPE_TO_TUNER_MAPPING if t.value != "ADAPTION_PROMPT"
                  and not issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[t], PromptLearningConfig))


class PeftLayer(AdapterLayer):
    """One of peft's tuner layers (e.g. ``peft.tuners.loha.layer.Linear``) as a petuner AdapterLayer.

    The peft layer keeps its own ``base_layer``; this wrapper registers no second copy of it
    (``AdapterLayer.__init__`` would), and reads merged/disabled state from peft. peft nests its layers where
    one module holds several adapted parameters (``target_parameters``: a MoE's fused expert weights, one
    ``ParamWrapper`` each); one PeftLayer wraps the outermost and merges, unmerges and switches them all.
    """

    def __init__(self, tuner_layer: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        nn.Module.__init__(self)
        self.tuner = tuner_layer
        self._trained = [p for p in tuner_layer.parameters() if p.requires_grad]  # as peft marked them
        self._nested = [m for m in tuner_layer.modules() if isinstance(m, BaseTunerLayer)]  # outermost first

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.tuner.get_base_layer()

    @property
    def merged(self) -> bool:  # type: ignore[override]
        return all(t.merged for t in self._nested)

    @property
    def disabled(self) -> bool:  # type: ignore[override]
        return bool(self.tuner.disable_adapters)

    @disabled.setter
    def disabled(self, value: bool) -> None:
        # peft's enable_adapters also flips requires_grad; petuner decides what trains, so keep it.
        flags = [(p, p.requires_grad) for p in self.tuner.parameters()]
        for tuner in self._nested:
            tuner.enable_adapters(not value)
        for p, flag in flags:
            p.requires_grad_(flag)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self._trained)

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        # peft's buffers are derived from the config (VeRA's projections from projection_prng_key),
        # and VeRA's are one tensor shared by every layer: nothing to save per layer.
        return {}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tuner(x, *args, **kwargs)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tuner(x) - self.base_layer(x)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """What peft's own ``merge`` adds to W. (peft's ``get_delta_weight`` means different things per
        tuner: a rotation for OFT, a function of W for MiSS; IA3 has none.) W is restored bit-exactly."""
        if self.merged:
            raise RuntimeError("delta_weight of a merged peft layer: unmerge it first")
        weight = self.base_layer.weight
        original = weight.detach().clone()
        self.tuner.merge()
        delta = weight.detach() - original
        with warnings.catch_warnings():  # IA3 warns that its unmerge is inexact: W is restored below
            warnings.simplefilter("ignore")
            self.tuner.unmerge()
        weight.copy_(original)
        return delta

    def merge(self) -> None:
        for tuner in self._nested:
            if not tuner.merged:
                tuner.merge()

    def unmerge(self) -> None:
        for tuner in reversed(self._nested):
            if tuner.merged:
                tuner.unmerge()


def orthogonal_regularization(model: nn.Module) -> torch.Tensor | float:
    """AdaLoRA's penalty Σ‖PᵀP − I‖_F / n over its P (lora_B) and Q (lora_A), exactly as
    ``peft.tuners.adalora.AdaLoraModel.forward`` computes it inline (there is no peft function for it)."""
    total: torch.Tensor | float = 0.0
    count = 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro")
            count += 1
    return total / count if count else 0.0


def fp32_adapters(model: nn.Module) -> None:
    """peft's ``autocast_adapter_dtype`` (what ``PeftModel`` does by default, which calling a tuner class
    directly skips): bf16/fp16 adapter tensors, shared ones such as VeRA's projections included, become
    fp32. AdaLoRA's ``ranknum`` (a constant, the current rank) comes back from peft's casts as a trainable
    parameter over a bf16/fp16 base; it never trains."""
    from peft.tuners.tuners_utils import cast_adapter_dtype

    cast_adapter_dtype(model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if name.endswith(f"ranknum.{ADAPTER}"):
            p.requires_grad_(False)


class AdaLoRAHook(Hook):
    """Runs AdaLoRA's importance update and rank allocation after each optimizer step, as peft expects it
    (after ``optimizer.step()``, before ``zero_grad``: the step's gradients are kept for it)."""

    def __init__(self, tuner_model: Any, total_step_from_run: bool) -> None:
        self.tuner_model = tuner_model
        self.total_step_from_run = total_step_from_run
        self.grads: list[tuple[nn.Parameter, torch.Tensor | None]] = []

    @property
    def config(self) -> Any:
        return self.tuner_model.peft_config[ADAPTER]

    def before_step(self, state: TrainState) -> None:
        c = self.config
        if self.total_step_from_run and c.total_step != state.max_steps:
            if c.tinit >= state.max_steps - c.tfinal:
                raise ConfigError(f"adapter.config: AdaLoRA's tinit={c.tinit} and tfinal={c.tfinal} leave no "
                                  f"budgeting phase in {state.max_steps} steps; allowed: tinit + tfinal < steps")
            c.total_step = state.max_steps

    def after_backward(self, state: TrainState) -> None:
        # Gradient clipping rescales these tensors in place afterwards, so the update sees clipped
        # gradients, as in peft's own loop.
        self.grads = [(p, p.grad) for p in self.tuner_model.model.parameters() if p.requires_grad]

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.skip_update:  # a skipped step (non-finite, or the fp16 scaler's overflow): no importance update
            self.grads = []
            return
        for p, grad in self.grads:
            p.grad = grad
        self.tuner_model.update_and_allocate(state.step - 1)  # peft counts steps from 0
        for p, _ in self.grads:
            p.grad = None
        self.grads = []

    def state_dict(self) -> dict[str, Any]:
        allocator = self.tuner_model.rankallocator
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self.config.rank_pattern, "total_step": self.config.total_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The scores go to the device of the parameter each belongs to (checkpoints load onto the CPU)."""
        allocator = self.tuner_model.rankallocator
        params = dict(self.tuner_model.model.named_parameters())

        def placed(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t.to(params[n].device) if n in params else t for n, t in scores.items()}

        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            placed(state["ipt"]), placed(state["exp_avg_ipt"]), placed(state["exp_avg_unc"]))
        self.config.rank_pattern = state["rank_pattern"]
        self.config.total_step = state["total_step"]


def check_peft_type(cfg: Any, key: str, group: str) -> None:
    allowed = peft_types()
    if cfg.get(key) not in allowed:
        raise ConfigError(f"{group}.{key}={cfg.get(key)!r}: allowed: {', '.join(allowed)}")


def check_peft_config(cfg: Any, key: str, group: str) -> None:
    value = cfg.get(key)
    if not isinstance(value, Mapping):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        cls = PEFT_TYPE_TO_CONFIG_MAPPING[cfg.get("peft_type")].__name__
        raise ConfigError(f"{group}.{key}={value!r}: must be a mapping of {cls} arguments, "
                          "e.g. {r: 8, target_modules: [q_proj, v_proj]}")


@dataclass
class PeftSchema(AdapterSchema):
    name: str = "peft"
    peft_type: str = checked("LORA", check_peft_type)  # a peft.PeftType name
    config: dict[str, Any] = items(dict, check_peft_config)  # the keyword arguments of its config class


@register_adapter
class PeftTuner(AdapterMethod, PeftNative, SwitchesOff):
    """``adapter=peft``: ``peft_type`` (a peft.PeftType name) and ``config`` (its config class's kwargs)."""

    name = "peft"
    schema: ClassVar[type[AdapterSchema]] = PeftSchema

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        config = self.cfg.config
        if config.get("target_modules") is None:
            raise ConfigError("adapter.config.target_modules is missing: name the layers to adapt "
                              "(e.g. ${model.lora_targets}, \"all-linear\" or a regex)")
        self.tuner_model: Any = None
        self.build_config()  # peft's own validation, now

    @property
    def adalora(self) -> bool:
        return self.cfg.peft_type == "ADALORA"

    def config_class(self) -> type:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        return PEFT_TYPE_TO_CONFIG_MAPPING[self.cfg.peft_type]

    def build_config(self, **override: Any) -> Any:
        """A fresh peft config (peft mutates the one it injects with); errors are one ConfigError line."""
        cls = self.config_class()
        kwargs = {**OmegaConf.to_container(self.cfg.config, resolve=True), **override}
        fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise ConfigError(f"adapter.config.{unknown[0]} is not an argument of peft's {cls.__name__}; "
                              f"allowed: {', '.join(fields)}")
        if self.adalora and kwargs.get("total_step") is None:
            # Only a placeholder that passes peft's check: AdaLoRAHook sets the run's step count.
            kwargs["total_step"] = kwargs.get("tinit", 0) + kwargs.get("tfinal", 0) + 1
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"adapter.config is rejected by peft's {cls.__name__}: {first_line(err)}") from None

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        """The modules ``target_modules`` names; with ``target_parameters`` (LoRA on parameters no linear
        layer holds: fused MoE experts) those are matched and logged too, and the modules may be none."""
        spec, parameters = self.cfg.config.target_modules, self.cfg.config.get("target_parameters")
        if parameters:
            named = match_parameters(model, list(parameters), exclude)
            log.info("adapter=peft target_parameters: %d parameters adapted (%s, ...)", len(named), named[0])
            if not spec:
                return []
        targets = match_targets(model, spec if isinstance(spec, str) else list(spec), exclude)
        if self.cfg.peft_type in NO_CONV1D:  # peft itself would refuse at injection, after the data is built
            refuse_conv1d(model, targets, f"adapter=peft peft_type={self.cfg.peft_type}")
        return targets

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.select_targets(model, exclude=head_modules)  # petuner's one-line error before peft runs
        spec = self.cfg.config.target_modules
        config = self.build_config(**({"target_modules": default_targets(model.config.model_type)}
                                      if spec == "auto" else {}))
        model.requires_grad_(False)
        # peft's tuner injects its layers into ``model`` in place and leaves only the adapters trainable.
        try:
            self.tuner_model = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](model, config, adapter_name=ADAPTER)
        except (TypeError, ValueError) as err:  # peft's word on a config that does not fit this model
            raise ConfigError(f"adapter.peft_type={self.cfg.peft_type}: peft cannot apply adapter.config to "
                              f"{type(model).__name__}: {first_line(err)}") from None
        fp32_adapters(model)
        targets: list[str] = []
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer) and not any(name.startswith(t + ".") for t in targets):
                set_submodule(model, name, PeftLayer(module))  # the outermost of nested layers only
                targets.append(name)
        for head in head_modules:
            model.get_submodule(head).requires_grad_(True)
        if self.adalora:
            weight = config.orth_reg_weight

            def add_regularizer(module: nn.Module, args: Any, output: Any) -> Any:
                # Training only (peft adds it in eval too): a held-out loss stays the task's loss. A scalar
                # loss only: per-position log-probabilities (a preference objective's) are no loss to add to.
                loss = getattr(output, "loss", None)
                if module.training and isinstance(loss, torch.Tensor) and loss.dim() == 0:
                    output.loss = output.loss + weight * orthogonal_regularization(module)
                return output

            model.register_forward_hook(add_regularizer)
        return Injection(targets=targets, head_modules=list(head_modules))

    def hooks(self, model: nn.Module) -> list[Hook]:
        if not self.adalora:
            return []
        if self.tuner_model is None:
            raise RuntimeError("PeftTuner.hooks() needs the injected model: call inject first")
        return [AdaLoRAHook(self.tuner_model, total_step_from_run=self.cfg.config.get("total_step") is None)]

    def peft_model(self, model: nn.Module, task: str, head_modules: Sequence[str], base_model: str | None,
                   load_base: Callable[[], nn.Module]) -> Any:
        from peft import get_peft_model

        targets = [name for name, _ in adapter_layers(model)]
        config = self.build_config(target_modules=targets, modules_to_save=list(head_modules) or None,
                                   task_type=PEFT_TASK_TYPES[task], base_model_name_or_path=base_model)
        peft_model = get_peft_model(load_base(), config)
        inner = peft_model.base_model.model
        for name, layer in adapter_layers(model):
            assert isinstance(layer, PeftLayer)
            inner.get_submodule(name).load_state_dict(layer.tuner.state_dict())
        for head in config.modules_to_save or []:
            wrapper = inner.get_submodule(head)
            wrapper.modules_to_save[ADAPTER].load_state_dict(model.get_submodule(head).state_dict())
        return peft_model.eval()
