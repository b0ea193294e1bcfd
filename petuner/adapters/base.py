"""What every adapter method provides, and the shared machinery to inject and manage it.

An adapter layer wraps one frozen ``nn.Linear`` (kept as ``base_layer``) and adds its own
parameters; it knows nothing of the loop, the data or the CLI. An ``AdapterMethod`` is the
registry entry: its ``schema`` (a dataclass, see ``petuner.schema``) types and checks its options;
it chooses target layers, builds the layers, and may provide loop hooks; what only some methods do
(a dynamic rank, a quantized base, ...) are small capability classes it opts into. Attribute names
follow peft's LoRA layout (``base_layer``, ``lora_A``, ``lora_B``) so that a LoRA-shaped state dict
*is* a peft one.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from petuner.adapters.conv1d import to_conv1d, to_linear
from petuner.schema import conform
from petuner.train.hooks import Hook


@dataclass
class AdapterSchema:
    """The options every method's schema has; a method's schema subclasses it (or another method's)."""

    name: str = ""


@dataclass
class LoRAFactors:
    """An adapter layer's update written as a LoRA: ΔW = scaling · B @ A (see ``AdapterLayer.lora_view``)."""

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

    fan_in_fan_out = False  # the model's layer was a Conv1D (W stored in × out): unload gives one back

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

    def weight_update(self) -> torch.Tensor:
        """ΔW relative to the original base weight (what ``lora_view`` describes): ``delta_weight`` unless the
        layer changed its own base (PiSSA keeps the residual). Export and merging read this one."""
        return self.delta_weight()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def lora_view(self) -> LoRAFactors | None:
        """This layer's update as LoRA factors, ΔW = scaling · B @ A relative to the original base weight, in
        peft's LoRA format (a variant's extra tensors in ``extra``, e.g. DoRA's magnitude); None where the
        update is no LoRA. The peft export writes exactly this."""
        return None

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers a run saves with the adapter (by name relative to the layer)."""
        return {name: buf for name, buf in self.named_buffers() if not name.startswith("base_layer.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + self.adapter_forward(x).to(out.dtype)  # fp32 adapters over a bf16 base: base's dtype

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
    """A registry entry: one PEFT method, configured from its ``conf/adapter/<name>.yaml``.

    Every method has these few operations; what only some methods do is a capability class that
    a method also derives from (``petuner.adapters.capabilities``: ``RankDynamic``, ``OwnsOptimizerParameters``,
    ``PreparesFromData``, ``QuantizedBase``, ``PeftNative``), looked up by callers with ``isinstance``.
    """

    name: ClassVar[str]
    # The dataclass of this method's options (its YAML's schema); a key it lacks is refused.
    schema: ClassVar[type[AdapterSchema]] = AdapterSchema
    # Where heavy preparation (decompositions, quantization) runs: the training device, set by the run;
    # each target moves there just before its layer is built, so the work runs one matrix at a time there.
    device: torch.device | None = None

    def __init__(self, cfg: DictConfig | dict[str, Any]) -> None:
        self.cfg = conform(self.schema, cfg, "adapter", f"adapter={self.name}")

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        """Names of the modules to wrap; raises if the spec matches none."""
        return []

    def make_layer(self, base_layer: nn.Linear) -> AdapterLayer:
        raise NotImplementedError(f"adapter={self.name} injects no layers")

    def make_named_layer(self, name: str, base_layer: nn.Linear) -> AdapterLayer:
        """The layer for the target ``name``: ``make_layer`` unless a method sizes its layers per target."""
        return self.make_layer(base_layer)

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        """Adapt ``model`` in place and set ``requires_grad`` on exactly what trains.

        The default wraps ``select_targets`` with ``make_layer``; a method whose layers come from
        elsewhere (the peft pass-through) overrides this. ``head_modules`` always train.
        """
        targets = self.select_targets(model, exclude=head_modules)
        model.requires_grad_(False)
        for name in tqdm(targets, desc=f"adapter={self.name}", unit="layer", disable=None):
            original = model.get_submodule(name)
            base = to_linear(original)  # a Conv1D as the equivalent nn.Linear: one layout for every method
            layer = self.make_named_layer(name, base if self.device is None else base.to(self.device))
            layer.fan_in_fan_out = base is not original
            set_submodule(model, name, layer)
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
        for head in head_modules:
            model.get_submodule(head).requires_grad_(True)
        return Injection(targets=targets, head_modules=list(head_modules))

    def hooks(self, model: nn.Module) -> list[Hook]:
        """Per-step behaviour for the loop, given the injected model (called once, after seeding)."""
        return []

    def peft_options(self) -> dict[str, Any] | None:
        """``peft.LoraConfig`` options for the peft export of the layers' ``lora_view`` (e.g. DoRA's
        ``use_dora``, LoRA's ``bias``); None: this method's update is no LoRA and has no peft form."""
        return None


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
    """Replace every adapter layer by its base layer (merged first unless ``merge=False``): an ``nn.Linear``,
    or the Conv1D the model had there."""
    for name, layer in list(adapter_layers(model)):
        base = layer.to_linear() if merge else layer.base_layer
        set_submodule(model, name, to_conv1d(base) if layer.fan_in_fan_out else base)
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
