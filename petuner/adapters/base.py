"""What every adapter method provides, and the shared machinery to inject and manage it.

An adapter layer wraps one frozen ``nn.Linear`` (kept as ``base_layer``) and adds its own
parameters; it knows nothing of the loop, the data or the CLI. An ``AdapterMethod`` is the
registry entry: it validates its options, chooses target layers, builds the layers, and may
provide loop hooks and a peft description of itself. Attribute names follow peft's LoRA layout
(``base_layer``, ``lora_A``, ``lora_B``) so that a LoRA-shaped state dict *is* a peft one.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from petuner.errors import ConfigError
from petuner.train.hooks import Hook


@dataclass
class LoRAFactors:
    """An adapter's update written as a plain LoRA: ΔW = scaling · B @ A."""

    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    scaling: float
    # Tensors peft's LoRA variant keeps besides A and B, by key relative to the layer
    # (DoRA's ``lora_magnitude_vector.weight``); empty for a plain LoRA.
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Injection:
    """What ``inject`` did: the wrapped modules and the trained task heads."""

    targets: list[str]
    head_modules: list[str] = field(default_factory=list)


class AdapterLayer(nn.Module, ABC):
    """A frozen ``nn.Linear`` plus an adapter's own parameters."""

    # True where ``base_layer`` holds its weight quantized (the merged export is then dequantized).
    quantized_base: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to the output for input ``x``."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in) such that the adapted layer equals a Linear with weight W + ΔW."""

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def as_lora(self) -> LoRAFactors | None:
        """This adapter as a plain LoRA, where the math allows (for peft export); else None."""
        return None

    def peft_lora(self) -> LoRAFactors | None:
        """This adapter in peft's LoRA format, a variant's extra tensors included (DoRA); else None."""
        return self.as_lora()

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers a run saves with the adapter (by name relative to the layer)."""
        return {name: buf for name, buf in self.named_buffers() if not name.startswith("base_layer.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + self.adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def to_linear(self) -> nn.Module:
        """A plain module computing this layer's output, adapter folded in (used by ``unload``).

        Layers over a quantized base override this to return a dequantized ``nn.Linear``.
        """
        self.merge()
        return self.base_layer


class AdapterMethod(ABC):
    """A registry entry: one PEFT method, configured from its ``conf/adapter/<name>.yaml``."""

    name: ClassVar[str]
    # Config keys this method accepts (besides ``name``); anything else is a misspelling.
    options: ClassVar[tuple[str, ...]] = ()
    # peft's task_type per petuner task, for the peft export.
    peft_task_types: ClassVar[dict[str, str]] = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}

    def __init__(self, cfg: DictConfig | dict[str, Any]) -> None:
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        unknown = sorted(set(cfg.keys()) - {"name", *self.options})
        if unknown:
            raise ConfigError(f"adapter.{unknown[0]} is not an option of adapter={self.name}; "
                              f"allowed: {', '.join(self.options) or '(none)'}")
        self.cfg = cfg

    def calibration_batches(self) -> int:
        """How many training batches ``prepare`` needs (0: none)."""
        return 0

    def prepare(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]]) -> None:
        """Look at the whole base model (and ``calibration_batches()`` batches) before injection."""
        return None

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        """Names of the modules to wrap; raises if the spec matches none."""
        return []

    def make_layer(self, base_layer: nn.Linear) -> AdapterLayer:
        raise NotImplementedError(f"adapter={self.name} injects no layers")

    def extra_trainable(self, model: nn.Module, targets: Sequence[str]) -> list[str]:
        """Names of base-model parameters this method also trains (e.g. biases)."""
        return []

    def trains_base_model(self) -> bool:
        """True for full fine-tuning: every base parameter trains."""
        return False

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        """Adapt ``model`` in place and set ``requires_grad`` on exactly what trains.

        The default wraps ``select_targets`` with ``make_layer``; a method whose layers come from
        elsewhere (the peft pass-through) overrides this. ``head_modules`` always train.
        """
        if self.trains_base_model():
            model.requires_grad_(True)
            return Injection(targets=[], head_modules=list(head_modules))
        targets = self.select_targets(model, exclude=head_modules)
        model.requires_grad_(False)
        for name in targets:
            set_submodule(model, name, self.make_layer(model.get_submodule(name)))
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
        params = dict(model.named_parameters())
        for name in self.extra_trainable(model, targets):
            params[name].requires_grad_(True)
        for head in head_modules:
            model.get_submodule(head).requires_grad_(True)
        return Injection(targets=targets, head_modules=list(head_modules))

    def hooks(self, model: nn.Module) -> list[Hook]:
        """Per-step behaviour for the loop, given the injected model (called once, after seeding)."""
        return []

    def ranks(self) -> list[int]:
        """The ranks a trained adapter can run at, for rank-dynamic methods (DyLoRA); empty otherwise."""
        return []

    def set_rank(self, model: nn.Module, rank: int) -> None:
        """Run every adapter layer at ``rank`` (evaluation and export of rank-dynamic methods)."""
        raise ConfigError(f"adapter={self.name} has a fixed rank; --rank needs a rank-dynamic adapter (dylora)")

    def own_optimizer_parameters(self, model: nn.Module) -> list[str]:
        """Names of trainable parameters this method updates itself (in a hook), not the main optimizer."""
        return []

    def peft_config(self, targets: Sequence[str], task: str, head_modules: Sequence[str],
                    base_model_name_or_path: str | None) -> Any:
        """A ``peft.PeftConfig`` describing this adapter as saved; None if it has no peft form."""
        return None

    def to_peft_model(self, model: nn.Module, config: Any, load_base: Callable[[], nn.Module]) -> Any:
        """For methods living in peft's own layers: a ``peft.PeftModel`` over ``load_base()`` holding
        ``model``'s trained adapter (the peft export saves it with peft's save_pretrained); None for
        petuner's own layers, exported through ``AdapterLayer.peft_lora``."""
        return None

    def export_note(self, fmt: str) -> str:
        """What a user of an export in format ``fmt`` must know (e.g. the base was quantized); "" if nothing."""
        return ""

    def report(self) -> dict[str, Any]:
        """What injection decided, for run.json (e.g. per-matrix quantization configs); {} if nothing."""
        return {}

    def restore(self, report: dict[str, Any]) -> None:
        """Before injection when a run is loaded: take what ``report`` said in training instead of deciding
        again (LQ-LoRA builds its saved per-matrix configs rather than recomputing them)."""
        return None


# --- target selection (peft's semantics: a list matches by name suffix, a string is a regex) ---

def linear_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _under(name, exclude)]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def output_layer_names(model: nn.Module) -> list[str]:
    """The output projection (e.g. lm_head), never adapted by "all-linear"."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [name for name, module in model.named_modules() if out is not None and module is out]


def match_targets(model: nn.Module, spec: str | Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Resolve ``target_modules`` to module names, as peft does; a spec matching nothing is an error."""
    if isinstance(spec, ListConfig):
        spec = list(spec)
    candidates = linear_names(model, exclude)
    if spec == "all-linear":
        skip = output_layer_names(model)
        found = [n for n in candidates if n not in skip]
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ConfigError(f"adapter.target_modules={spec!r} is not a valid regex ({err})") from None
        found = [n for n in candidates if pattern.fullmatch(n)]
    else:
        keys = [str(k) for k in spec]
        found = [n for n in candidates if any(n == k or n.endswith("." + k) for k in keys)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(f"adapter.target_modules={spec!r} matches no nn.Linear in "
                          f"{type(model).__name__}; its linear layers are named: {', '.join(leaves)} "
                          "(or use \"all-linear\" or a regex)")
    return found


def check_rank_fits(model: nn.Module, targets: Sequence[str], r: int) -> None:
    for name in targets:
        layer = model.get_submodule(name)
        limit = min(layer.in_features, layer.out_features)
        if r > limit:
            raise ConfigError(f"adapter.r={r} exceeds the size of {name} ({layer.out_features}×{layer.in_features}); "
                              f"allowed: 1..{limit}")


# --- working on a model's adapter layers ---

def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def merge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by its base Linear (merged first unless ``merge=False``)."""
    for name, layer in list(adapter_layers(model)):
        set_submodule(model, name, layer.to_linear() if merge else layer.base_layer)
    return model


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off (merged ones are unmerged for the duration)."""
    layers = [layer for _, layer in adapter_layers(model)]
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged, strict=True):
            layer.disabled = False
            if merged:
                layer.merge()
