"""LQ-LoRA: the decomposition, the ILP bit allocation, the adapter, its cache, training and exports."""

from __future__ import annotations

import copy
import itertools
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

import petuner
import petuner.adapters.lq_lora as lq_module
from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.adapters.lq_lora import empirical_fisher
from petuner.errors import ConfigError, PetunerError
from petuner.export import export
from petuner.models import load_model
from petuner.quant import (
    QuantConfig,
    allocate,
    bits_per_param,
    fisher_weights,
    grid,
    lq_decompose,
    quantize,
    weighted_error,
)
from petuner.run import run
from tests.helpers import tiny_llama


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Decompositions go to a per-test cache, so every test computes its own."""
    monkeypatch.setattr(lq_module, "decomposition_cache", lambda: tmp_path / "lq_cache")


def low_rank_plus_noise(m: int = 256, n: int = 256, rank: int = 4, seed: int = 0) -> torch.Tensor:
    """A weight with a few strong directions (as trained LLM weights have) on top of Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) * 0.05 + \
        torch.randn(m, n, generator=g) * 0.02


def lq_cfg(**kw):
    base = {"name": "lq_lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
            "scaling": "standard", "bias": "none", "bits": 3, "block_size": 64, "iterations": 4, "fisher": False,
            "calibration_batches": 2, "budget_bits": None}
    return OmegaConf.create({**base, **kw})


# --- the decomposition -------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kept_iterate_has_the_least_error_and_it_is_the_true_error(bits: int) -> None:
    w = low_rank_plus_noise()
    dec = lq_decompose(w, rank=4, bits=bits, block_size=64, iterations=8)
    assert dec.error == min(dec.errors) and dec.error <= dec.errors[0]
    residual = w - dec.q.dequantize() - dec.L1 @ dec.L2
    assert weighted_error(residual) == pytest.approx(dec.error, rel=1e-6)
    # it stops at the first iterate that does not improve, or runs them all
    assert len(dec.errors) == 8 or dec.errors[-1] >= dec.errors[-2]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decomposition_beats_plain_quantization_at_equal_quantization_bits(bits: int) -> None:
    w = low_rank_plus_noise()
    dec = lq_decompose(w, rank=4, bits=bits, block_size=64, iterations=5)
    plain = weighted_error(w - quantize(w, bits, 64).dequantize())
    assert dec.error < 0.8 * plain


def test_three_bit_lq_beats_four_bit_plain_at_fewer_total_bits() -> None:
    w = low_rank_plus_noise()
    dec = lq_decompose(w, rank=4, bits=3, block_size=64, iterations=5)
    lq_bits = bits_per_param(3, 64) + 16 * 4 * sum(w.shape) / w.numel()  # 16-bit L1, L2
    assert lq_bits < bits_per_param(4, 64)
    assert dec.error < weighted_error(w - quantize(w, 4, 64).dequantize())


def test_fisher_weighting_lowers_the_weighted_error() -> None:
    w = low_rank_plus_noise()
    g = torch.Generator().manual_seed(1)
    fisher = torch.rand(256, 1, generator=g) ** 4 * torch.rand(1, 256, generator=g) ** 4  # uneven importance
    weighted = lq_decompose(w, 4, 3, 64, 5, fisher)
    plain = lq_decompose(w, 4, 3, 64, 5)
    plain_in_weighted_norm = weighted_error(w - plain.q.dequantize() - plain.L1 @ plain.L2, fisher)
    assert weighted.error < plain_in_weighted_norm


def test_the_error_is_the_full_diagonal_fisher_one_not_its_row_column_surrogate() -> None:
    """‖√F ⊙ (W − Q − L1 L2)‖² with an F that is not rank-1; its row/column reduction gives another number."""
    w = low_rank_plus_noise()
    fisher = torch.rand(256, 256, generator=torch.Generator().manual_seed(2)) ** 4
    dec = lq_decompose(w, 4, 3, 64, 4, fisher)
    residual = (w - dec.q.dequantize() - dec.L1 @ dec.L2).double()
    assert dec.error == pytest.approx(float((fisher.double() * residual.square()).sum()), rel=1e-9)
    row, col = fisher_weights(fisher)
    surrogate = float((residual * row[:, None].double() * col[None, :].double()).square().sum())
    assert abs(surrogate - dec.error) > 0.05 * dec.error


def test_grid_is_bits_by_first_level_by_second_level_block() -> None:
    configs = grid()
    assert len(configs) == 4 * 3 * 3 == len(set(configs))
    assert {(q.bits, q.block_size, q.group_size) for q in configs} == set(itertools.product(
        (2, 3, 4, 8), (16, 32, 64), (16, 64, 256)))
    counts = {g: len(build_adapter(lq_cfg(budget_bits=3.0, allocation_grid=g)).configs())
              for g in ("paper", "bits_blocks", "bits")}
    assert counts == {"paper": 36, "bits_blocks": 12, "bits": 4}
    assert build_adapter(lq_cfg()).configs() == [QuantConfig(3, 64, 256)]  # no budget: bits, block_size
    w = low_rank_plus_noise()
    for q in (QuantConfig(3, 16, 16), QuantConfig(2, 64, 64)):  # storage as the config says
        packed = quantize(w, q.bits, q.block_size, q.group_size)
        assert packed.nbytes() * 8 == pytest.approx(w.numel() * q.bits_per_param, rel=1e-3)
        assert (packed.dequantize() - w).abs().max() < w.abs().max()


# --- the empirical Fisher ----------------------------------------------------------------------

def test_empirical_fisher_equals_a_batch_1_loop_and_is_not_the_squared_batch_gradient() -> None:
    """Per-example gradients, squared, averaged over examples: from padded batches of 3 it equals a loop over
    the examples one at a time (each unpadded) within 1e-6 of the Fisher's scale (1e-5 relative);
    squaring the batch-mean gradient does not."""
    model = tiny_llama().eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 10, 4, 10, 9, 6]
    examples = [torch.randint(0, 128, (n,), generator=gen) for n in lengths]
    batches = []
    for chunk in (examples[:3], examples[3:]):
        ids = torch.zeros(3, 10, dtype=torch.long)
        mask = torch.zeros(3, 10, dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, :len(e)], mask[i, :len(e)] = e, 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    weights = [model.get_submodule(n).weight for n in names]
    fisher = empirical_fisher(model, weights, batches)
    for w in weights:
        w.requires_grad_(True)
    loop = [torch.zeros_like(w) for w in weights]
    for e in examples:
        grads = torch.autograd.grad(model(input_ids=e[None], labels=e[None]).loss, weights)
        for total, g in zip(loop, grads, strict=True):
            total += g.square() / len(examples)
    for ours, ref in zip(fisher, loop, strict=True):
        scale = float(ref.abs().max())  # ~1e-5 here: the tolerance is relative to it
        assert scale > 0
        torch.testing.assert_close(ours, ref, atol=1e-6 * scale, rtol=1e-5)
    squared_mean = [torch.autograd.grad(model(**b).loss, weights) for b in batches]
    squared_mean = [sum(g[i] for g in squared_mean).div(2).square() for i in range(len(weights))]
    assert not torch.allclose(squared_mean[0], loop[0], atol=1e-6 * float(loop[0].abs().max()), rtol=1e-5)


# --- the bit allocation ------------------------------------------------------------------------

def test_ilp_is_optimal_and_within_budget_on_a_brute_forceable_case() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 10, size=6) * 1000
    per_param = np.array([bits_per_param(b, 64) for b in (2, 3, 4, 8)])
    bits = sizes[:, None] * per_param[None, :]
    errors = sizes[:, None] * rng.uniform(0.5, 2, size=(6, 1)) * np.array([16.0, 4.0, 1.0, 0.01])[None, :]
    for budget_per_param in (2.5, 3.0, 3.5, 5.0):
        budget = budget_per_param * sizes.sum()
        picks = allocate(errors, bits, budget)
        assert sum(bits[i, c] for i, c in enumerate(picks)) <= budget
        best = min((sum(errors[i, c] for i, c in enumerate(choice)), choice)
                   for choice in itertools.product(range(4), repeat=6)
                   if sum(bits[i, c] for i, c in enumerate(choice)) <= budget)
        assert sum(errors[i, c] for i, c in enumerate(picks)) == pytest.approx(best[0], rel=1e-9)


def test_ilp_rejects_a_budget_below_the_cheapest_allocation() -> None:
    with pytest.raises(ConfigError, match="below the cheapest allocation"):
        allocate(np.ones((2, 2)), np.array([[2.0, 4.0], [2.0, 4.0]]), 3.0)


# --- the adapter -------------------------------------------------------------------------------

def test_adapter_starts_at_q_plus_low_rank_and_holds_only_packed_weights() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject(model, build_adapter(lq_cfg()))
    for name, layer in adapter_layers(model):
        w = base.get_submodule(name).weight
        dec = lq_decompose(w, rank=4, bits=3, block_size=64, iterations=4)  # what the layer was built from
        torch.testing.assert_close(layer.base_weight(), dec.q.dequantize(), atol=0, rtol=0)
        torch.testing.assert_close(layer.delta_weight(), dec.L1 @ dec.L2, atol=1e-6, rtol=1e-5)  # s·B·A = L1·L2
        assert (layer.merged_weight() - w).norm() < (quantize(w, 3, 64).dequantize() - w).norm()
        assert not any(t.shape == w.shape for t in [*layer.base_layer.parameters(), *layer.base_layer.buffers()])
        held = sum(b.numel() * b.element_size() for b in layer.base_layer.buffers())
        assert held * 8 == pytest.approx(w.numel() * bits_per_param(3, 64), rel=0.02)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for name, _ in adapter_layers(model):
            weight = plain.get_submodule(name).weight
            weight.copy_(quantize(weight, 3, 64).dequantize())
        ref = base(input_ids=ids).logits
        assert (model(input_ids=ids).logits - ref).abs().max() < (plain(input_ids=ids).logits - ref).abs().max()


def test_no_reference_to_the_full_precision_weights_survives_injection() -> None:
    import gc
    import weakref

    model = tiny_llama()
    method = build_adapter(lq_cfg())
    originals = [weakref.ref(model.get_submodule(n).weight) for n in method.select_targets(model)]
    inject(model, method)
    gc.collect()
    assert all(ref() is None for ref in originals)


def test_budget_allocation_respects_the_budget_and_reports_every_matrix() -> None:
    model = tiny_llama()
    method = build_adapter(lq_cfg(target_modules="all-linear", budget_bits=3.0))
    injection = inject(model, method)
    report = method.report()
    assert set(report["matrices"]) == set(injection.targets)
    assert {(m["bits"], m["block_size"], m["group_size"]) for m in report["matrices"].values()} <= {
        (q.bits, q.block_size, q.group_size) for q in grid()}
    assert len({m["bits"] for m in report["matrices"].values()}) > 1  # a real mix, not one width
    assert report["quantized_bits_per_param"] <= 3.0
    held = sum(b.numel() * b.element_size() for _, layer in adapter_layers(model) for b in layer.base_layer.buffers())
    assert report["quantized_bytes"] == held
    assert report["bits_per_param"] == pytest.approx(report["quantized_bits_per_param"]
                                                     + report["low_rank_bits_per_param"])


def test_a_second_injection_reads_the_decompositions_from_the_cache(monkeypatch) -> None:
    first = tiny_llama()
    inject(first, build_adapter(lq_cfg()))
    calls = []
    monkeypatch.setattr(lq_module, "lq_decompose", lambda *a, **k: calls.append(a))
    second = tiny_llama()
    inject(second, build_adapter(lq_cfg()))
    assert calls == []
    for (_, a), (_, b) in zip(adapter_layers(first), adapter_layers(second), strict=True):
        assert torch.equal(a.base_layer.codes, b.base_layer.codes)
        assert torch.equal(a.lora_B.weight, b.lora_B.weight)


@pytest.mark.parametrize("key, value, message", [
    ("bits", 5, r"adapter.bits=5: allowed: 2, 3, 4, 8"),
    ("block_size", 100, r"adapter.block_size=100: allowed: 16, 32, 64"),
    ("budget_bits", 1.5, r"adapter.budget_bits=1.5: must be null or a number >= 2.127"),
    ("iterations", 0, r"adapter.iterations=0: must be an integer > 0"),
    ("fisher", "yes", r"adapter.fisher='yes': must be true or false"),
    ("allocation_grid", "all", r"adapter.allocation_grid='all': allowed: paper, bits_blocks, bits"),
])
def test_bad_options_are_one_clear_line(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_adapter(lq_cfg(**{key: value}))
    assert "\n" not in str(err.value)


# --- a real run --------------------------------------------------------------------------------

def test_fisher_run_reloads_with_an_empty_cache_and_its_exports_match(cfg_factory, tmp_path, monkeypatch) -> None:
    """The run folder alone rebuilds the trained model: with an empty $PETUNER_CACHE and nothing allowed to
    recompute (no Fisher, no decomposition), ``petuner.load`` gives the trained model's logits exactly."""
    from petuner.train.loop import Loop

    trained = {}
    original = Loop.train

    def keep_model(self, *args, **kwargs):
        trained["model"] = self.model
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Loop, "train", keep_model)
    cfg = cfg_factory("adapter=lq_lora", "adapter.fisher=true", "adapter.calibration_batches=2",
                      "adapter.budget_bits=3.5", "adapter.r=4", "adapter.iterations=3")
    info = run(cfg)
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    assert info["adapter_report"]["quantized_bits_per_param"] <= 3.5
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained["model"].eval()(input_ids=ids).logits
    monkeypatch.setattr(lq_module, "decomposition_cache", lambda: tmp_path / "empty_cache")
    monkeypatch.setattr(lq_module, "lq_decompose", lambda *a, **k: pytest.fail("recomputed a decomposition"))
    monkeypatch.setattr(lq_module, "empirical_fisher", lambda *a, **k: pytest.fail("recomputed the Fisher"))
    loaded, _ = petuner.load(cfg.run_dir)
    with torch.no_grad():
        ours = loaded(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    assert not (tmp_path / "empty_cache").exists()
    merged = AutoModelForCausalLM.from_pretrained(export(cfg.run_dir, "merged", tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ours).abs().max() <= 1e-4
    out = export(cfg.run_dir, "peft", tmp_path / "peft")
    assert "quantized base Q" in (out / "README.md").read_text()
    base = load_model(cfg.model)  # the base as the adapter saw it: Q, dequantized
    with torch.no_grad():
        for name, layer in adapter_layers(loaded):
            base.get_submodule(name).weight.copy_(layer.base_weight())
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ours).abs().max() <= 1e-5
    # the quantized export keeps the packed mixed-precision base: moved elsewhere, it loads the same model
    exported = export(cfg.run_dir, "quantized", tmp_path / "quantized")
    moved = tmp_path / "elsewhere"
    shutil.copytree(exported, moved)
    shutil.rmtree(cfg.run_dir)
    model, _ = petuner.load(moved)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    packed = sum(b.numel() for _, layer in adapter_layers(model) for b in layer.base_layer.buffers())
    dense = sum(layer.in_features * layer.out_features for _, layer in adapter_layers(model))
    assert packed < dense  # uint8 codes + scales, not dense weights
    assert not (tmp_path / "empty_cache").exists()


def test_quantized_export_needs_a_quantized_base(trained_run, tmp_path) -> None:
    with pytest.raises(PetunerError, match="has no quantized base: use --format peft or merged"):
        export(trained_run, "quantized", tmp_path / "out")
