"""Every registered adapter through the same tests. A new method adds one row to ADAPTERS."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
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
from tests.test_lora import tiny_llama

# name → (adapter config, modules it must wrap in the tiny Llama)
QV = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
ADAPTERS = {
    "lora": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "scaling": "standard", "bias": "none"}, QV),
    "none": ({"name": "none"}, []),
    "dylora": ({"name": "dylora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                "mode": "frozen", "rank_weights": None, "eval_all_ranks": False}, QV),
    "sora": ({"name": "sora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "gate_init": "ones", "gate_optimizer": "sgd", "gate_lr": 0.01, "xi": 0.5, "xi_schedule": "constant",
              "xi_final": 1.0, "xi_steps": 4}, QV),
    "qlora": ({"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
               "scaling": "standard", "bias": "none"}, QV),
    "lq_lora": ({"name": "lq_lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                 "scaling": "standard", "bias": "none", "bits": 3, "block_size": 64, "iterations": 3, "fisher": False,
                 "calibration_batches": 1, "budget_bits": None}, QV),
    "lora_dora": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                   "scaling": "standard", "bias": "none", "init": "kaiming", "variant": "dora"}, QV),
    "lora_pissa": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                    "scaling": "rslora", "bias": "none", "init": "pissa", "variant": "standard"}, QV),
    "block_lora": ({"name": "block_lora", "r": 4, "alpha": 8, "dropout": 0.0, "n_blocks": 4,
                    "target_modules": ["q_proj", "v_proj"], "scaling": "standard", "bias": "none"}, QV),
    "loldu": ({"name": "loldu", "r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, QV),
    "svfit": ({"name": "svfit", "r": 4, "target_modules": ["q_proj", "v_proj"]}, QV),
    # peft's own tuners through adapter=peft (the ready configs adapter=loha / adalora / vera)
    "peft": ({"name": "peft", "peft_type": "LOHA",
              "config": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}, QV),
    "peft_adalora": ({"name": "peft", "peft_type": "ADALORA",
                      "config": {"init_r": 4, "target_r": 2, "lora_alpha": 32, "total_step": 10,
                                 "target_modules": ["q_proj", "v_proj"]}}, QV),
    "peft_vera": ({"name": "peft", "peft_type": "VERA",
                   "config": {"r": 8, "d_initial": 0.1, "target_modules": ["q_proj", "v_proj"]}}, QV),
}
# Rows whose frozen base is quantized: with the adapter off the model is that quantized base (not the fp32
# tiny Llama), and the base layer as a dense Linear holds the dequantized weight (``layer.base_weight()``).
QUANTIZED_BASE = {"qlora", "lq_lora"}


def test_every_registered_adapter_has_a_row() -> None:
    assert set(adapter_names()) == {cfg["name"] for cfg, _ in ADAPTERS.values()}


def adapted(name: str, seed: int = 0):
    cfg, _ = ADAPTERS[name]
    model = tiny_llama()
    inject(model, build_adapter(OmegaConf.create(cfg)))
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
    assert [n for n, _ in adapter_layers(model)] == ADAPTERS[name][1]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_gradients_reach_exactly_the_trainable_parameters(name: str) -> None:
    model = adapted(name)
    trainable = set(trainable_parameters(model))
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    if ADAPTERS[name][1]:
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


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][1]])
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


@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][1]])
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


def owns_contiguous_storage(t: torch.Tensor) -> bool:
    size = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == size


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_tensors_own_contiguous_storage(name: str) -> None:
    """A parameter that is a strided view into a decomposition is mis-updated by fused AdamW (which
    treats it as contiguous) and keeps the whole matrix alive; so does a buffer view."""
    model = tiny_llama()
    inject(model, build_adapter(OmegaConf.create(ADAPTERS[name][0])))
    tensors = {**trainable_parameters(model), **adapter_state_dict(model)}
    assert tensors or name == "none"
    bad = sorted(n for n, t in tensors.items() if not owns_contiguous_storage(t))
    assert not bad


@pytest.mark.parametrize("name", ["loldu", "svfit"])
def test_fused_adamw_trains_every_diagonal_entry(name: str) -> None:
    from petuner.optim import build_optimizer

    model = tiny_llama()
    inject(model, build_adapter(OmegaConf.create(ADAPTERS[name][0])))
    trainable = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    cfg = OmegaConf.load("conf/optimizer/adamw.yaml")
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert optimizer.defaults["fused"]
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    for n, p in trainable.items():
        assert (p != before[n]).all(), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n in sorted(ADAPTERS) if ADAPTERS[n][1]])
def test_adapters_are_fp32_over_a_low_precision_base(name: str, dtype: torch.dtype) -> None:
    """peft's autocast_adapter_dtype for every method, peft's own tuners too; AdaLoRA's ranknum never trains."""
    model = tiny_llama().to(dtype)
    inject(model, build_adapter(OmegaConf.create(ADAPTERS[name][0])))
    trainable = trainable_parameters(model)
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert not [n for n in trainable if "ranknum" in n]
    floats = [t for t in adapter_state_dict(model).values() if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float32}
    logits = model(input_ids=IDS).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_layers_are_built_on_the_training_device_one_matrix_at_a_time() -> None:
    """Decompositions and quantization (PiSSA, SVFit, LoLDU, QLoRA) run in ``make_layer``: each target
    reaches ``method.device`` (meta here, standing in for a GPU) just before its layer is built."""
    model = tiny_llama()
    method = build_adapter(OmegaConf.create(ADAPTERS["lora"][0]))
    method.device = torch.device("meta")
    seen: list[tuple[torch.device, int]] = []
    build = method.make_layer

    def spy(base):
        on_device = sum(p.is_meta for n, p in model.named_parameters()
                        if n.endswith(("proj.weight", "proj.base_layer.weight")))
        seen.append((base.weight.device, on_device))
        return build(base)

    method.make_layer = spy
    inject(model, method)
    assert seen == [(torch.device("meta"), k) for k in range(1, len(QV) + 1)]
