"""Every registered adapter through the same tests. A new method adds one row to ADAPTERS."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from petuner.adapters import (
    adapter_layers,
    adapter_names,
    adapter_state_dict,
    build_adapter,
    disabled_adapters,
    inject,
    load_adapter_state_dict,
    merge_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from petuner.config import group_choices
from tests.helpers import ADAPTERS, QV, row_cfg, shipped_cfg, tiny_llama

# Rows whose frozen base is quantized: with the adapter off the model is that quantized base (not the fp32
# tiny Llama), and the base layer as a dense Linear holds the dequantized weight (``layer.base_weight()``).
QUANTIZED_BASE = {"qlora", "lq_lora"}


def test_every_registered_adapter_and_shipped_yaml_has_a_row() -> None:
    assert set(adapter_names()) == {row_cfg(name)["name"] for name in ADAPTERS}
    assert set(group_choices("adapter")) == {yaml for yaml, _, _ in ADAPTERS.values()}


def adapted(name: str, seed: int = 0):
    model = tiny_llama()
    inject(model, build_adapter(row_cfg(name)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every adapter off its (often identity) init
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_injection_hits_exactly_the_targets(name: str) -> None:
    model = adapted(name)
    assert [n for n, _ in adapter_layers(model)] == ADAPTERS[name][2]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_gradients_reach_exactly_the_trainable_parameters(name: str) -> None:
    model = adapted(name)
    trainable = set(trainable_parameters(model))
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    if ADAPTERS[name][2]:
        # a layer's own parameters (what ``adapter_parameters`` returns: for petuner's layers everything
        # outside base_layer; for peft's, what peft trains)
        own = {f"{ln}.{pn}" for ln, layer in adapter_layers(model)
               for pn, p in layer.named_parameters() if any(p is q for q in layer.adapter_parameters())}
        assert trainable == own


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = adapted(name, seed=1)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, tmp_path / "a.safetensors")
    fresh = adapted(name, seed=2)
    load_adapter_state_dict(fresh, load_file(tmp_path / "a.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][2]])
def test_merge_equals_unmerged_and_disable_gives_base(name: str) -> None:
    model = adapted(name)
    base = unload(copy.deepcopy(model), merge=False) if name in QUANTIZED_BASE else tiny_llama()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        assert not torch.allclose(unmerged, base(input_ids=IDS).logits, atol=1e-4)
        merge_adapters(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
        unmerge_adapters(model)
        with disabled_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][2]])
def test_delta_weight_is_the_layer_change(name: str) -> None:
    model = adapted(name)
    for _, layer in adapter_layers(model):
        x = torch.randn(3, layer.in_features)
        if name in QUANTIZED_BASE:
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.base_layer.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(layer.base_weight())
        else:
            dense = copy.deepcopy(layer.base_layer)
        with torch.no_grad():
            dense.weight += layer.delta_weight()
            torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)


# Rows whose layers have no LoRA view: peft's own tuners (adapter=peft and the ready loha / adalora / vera
# configs) are saved by peft itself, in their own format, so petuner never restates them as LoRA factors.
NO_VIEW = {"peft", "peft_adalora", "peft_loha", "peft_vera"}
VIEWS = [n for n in sorted(ADAPTERS) if ADAPTERS[n][2] and n not in NO_VIEW]


@pytest.mark.parametrize("name", VIEWS)
def test_lora_view_is_the_layer_update(name: str) -> None:
    """Each layer's LoRA view gives its weight: relative to the original base weight (PiSSA's moved top-r
    included), DoRA's magnitude re-scaling each output row as peft does, and over the dequantized base for the
    quantized ones (the original weight is not kept). Planted and seen to fail: QLoRALinear.lora_view with the
    scaling doubled. (The old test skipped 7 of 14 rows, QLoRA, LQ-LoRA, DoRA and the peft tuners, silently.)"""
    model = adapted(name)
    original = dict(tiny_llama().named_modules())
    for layer_name, layer in adapter_layers(model):
        view = layer.lora_view()
        with torch.no_grad():
            if name in QUANTIZED_BASE:
                base = layer.base_weight()
                adapted_weight = base + layer.delta_weight()
            else:
                base, adapted_weight = original[layer_name].weight, layer.base_layer.weight + layer.delta_weight()
            weight = base + view.scaling * view.B @ view.A
            if view.extra:  # DoRA: W' = m / ||W + s B A||_row * (W + s B A)
                magnitude = view.extra.pop("lora_magnitude_vector.weight")
                weight = (magnitude / weight.norm(dim=1)).unsqueeze(1) * weight
            assert not view.extra, view.extra.keys()
            torch.testing.assert_close(weight, adapted_weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(NO_VIEW))
def test_peft_tuners_have_no_lora_view(name: str) -> None:
    assert all(layer.lora_view() is None for _, layer in adapter_layers(adapted(name)))


LORA_SHAPED = [n for n in sorted(ADAPTERS)
               if build_adapter(row_cfg(n)).peft_options() is not None and n not in QUANTIZED_BASE]


@pytest.mark.parametrize("name", LORA_SHAPED)
def test_peft_export_reloads_in_peft_with_the_same_logits(name: str, tmp_path) -> None:
    """Every method whose update is a LoRA: its peft form, written as the export writes it and reloaded by
    peft's own PeftModel.from_pretrained over the original base, gives the adapted model's logits."""
    from peft import PeftModel

    from petuner.adapters.peft_form import lora_config, lora_state_dict, lora_views

    method = build_adapter(row_cfg(name))
    model = tiny_llama()
    inject(model, method)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    factors = {n: v for n, v in lora_views(model).items() if v is not None and v.A.shape[0] > 0}
    assert factors and len(factors) == len(ADAPTERS[name][2])
    lora_config(factors, method.peft_options(), "causal_lm", [], None).save_pretrained(str(tmp_path))
    save_file({k: v.detach().contiguous() for k, v in lora_state_dict(model, factors).items()},
              tmp_path / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=0)


def owns_contiguous_storage(t: torch.Tensor) -> bool:
    size = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == size


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_tensors_own_contiguous_storage(name: str) -> None:
    """A parameter that is a strided view into a decomposition is mis-updated by fused AdamW (which
    treats it as contiguous) and keeps the whole matrix alive; so does a buffer view."""
    model = tiny_llama()
    inject(model, build_adapter(row_cfg(name)))
    tensors = {**trainable_parameters(model), **adapter_state_dict(model)}
    assert tensors or name == "none"
    bad = sorted(n for n, t in tensors.items() if not owns_contiguous_storage(t))
    assert not bad


@pytest.mark.parametrize("name", ["loldu", "svfit"])
def test_fused_adamw_trains_every_diagonal_entry(name: str) -> None:
    from petuner.optim import build_optimizer

    model = tiny_llama()
    inject(model, build_adapter(row_cfg(name)))
    trainable = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    cfg = shipped_cfg("optimizer", "adamw")
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert optimizer.defaults["fused"]
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    for n, p in trainable.items():
        assert (p != before[n]).all(), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][2]])
def test_adapters_are_fp32_over_a_low_precision_base(name: str, dtype: torch.dtype) -> None:
    """peft's autocast_adapter_dtype for every method, peft's own tuners too; AdaLoRA's ranknum never trains."""
    model = tiny_llama().to(dtype)
    inject(model, build_adapter(row_cfg(name)))
    trainable = trainable_parameters(model)
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert not [n for n in trainable if "ranknum" in n]
    floats = [t for t in adapter_state_dict(model).values() if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float32}
    logits = model(input_ids=IDS).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def check_built_on_device(name: str, device: torch.device) -> None:
    """Each target reaches ``method.device`` just before its layer is built (one more base weight there per
    layer, never all at once), and the layer's decomposition or quantization ran there: its tensors are on it."""
    model = tiny_llama()
    method = build_adapter(row_cfg(name))
    method.device = device
    seen: list[tuple[str, int]] = []
    build = method.make_layer

    def spy(base):
        on_device = sum(p.device.type == device.type for n, p in model.named_parameters()
                        if n.endswith(("proj.weight", "proj.base_layer.weight")))
        seen.append((base.weight.device.type, on_device))
        return build(base)

    method.make_layer = spy
    inject(model, method)
    assert seen == [(device.type, k) for k in range(1, len(QV) + 1)]
    for layer_name, layer in adapter_layers(model):
        tensors = [*layer.adapter_parameters(), *layer.adapter_buffers().values()]
        assert tensors and all(t.device.type == device.type for t in tensors), layer_name


# The meta device stands in for a GPU. LoLDU checks its pivots against the weight's values (a host sync that a
# meta tensor cannot give), so it runs only in the gpu test below.
@pytest.mark.parametrize("name", ["lora", "lora_pissa", "svfit", "qlora"])
def test_layers_are_built_on_the_training_device_one_matrix_at_a_time(name: str) -> None:
    """Decompositions and quantization (PiSSA, SVFit, QLoRA) run in ``make_layer``, on the training device.
    Seen to fail with AdapterMethod.apply moving the whole model to the device before building any layer."""
    check_built_on_device(name, torch.device("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lora_pissa", "svfit", "loldu", "qlora"])
def test_layers_are_prepared_on_a_cuda_device_one_matrix_at_a_time(name: str) -> None:
    check_built_on_device(name, torch.device("cuda"))


# Methods that cannot be DPO's reference by switching off, and why (their one-line refusal).
# aTLAS starts from its sources' average update and a merged run from its merge: off is not where they start.
NO_SWITCH = {"lq_lora": "adapter=lq_lora starts from non-zero factors",
             "atlas": "adapter=atlas cannot switch itself off", "merged": "adapter=merged cannot switch itself off"}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_three_dpo_steps_with_the_reference_from_the_switch(name: str) -> None:
    """Every method trains DPO with the reference its switch gives (full fine-tuning: a frozen copy): the
    first loss is log 2 (the switched-off model is the starting one), the loss falls, and switching off and
    on again leaves the trained model's outputs bit-identical."""
    import math

    from petuner.errors import ConfigError
    from petuner.objectives import build_objective
    from petuner.objectives.pairs import sequence_logps
    from petuner.objectives.reference import build_reference
    from tests.helpers import pair_batch

    model, method = tiny_llama(), build_adapter(row_cfg(name))
    inject(model, method)
    if name in NO_SWITCH:
        with pytest.raises(ConfigError, match=NO_SWITCH[name]):
            build_reference(model, method, continued=False, heads=[])
        return
    objective = build_objective({"name": "dpo", "beta": 0.5})
    objective.reference = build_reference(model, method, continued=False, heads=[])
    # no dropout in these rows: a forward hook must not change the log-probabilities in training (AdaLoRA's
    # regulariser was added to every position until it was kept to scalar losses)
    with torch.no_grad():
        training = sequence_logps(model.train(), pair_batch())[0]
        torch.testing.assert_close(training, sequence_logps(model.eval(), pair_batch())[0], atol=1e-6, rtol=0)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    batch, losses = pair_batch(), []
    for _ in range(3):
        loss, _ = objective.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[2] < losses[0] - 1e-3
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
        if name != "none":
            with method.switched_off(model):
                assert not torch.allclose(model(input_ids=IDS).logits, trained)
        assert torch.equal(model(input_ids=IDS).logits, trained)
