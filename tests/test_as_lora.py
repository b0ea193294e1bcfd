"""--as-lora: every table adapter as one plain LoRA that peft reloads with the adapted model's logits; exact and
unchanged for LoRA-shaped methods; the reported error is the truncation's true error."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.adapters.capabilities import QuantizedBase
from petuner.adapters.peft_form import lora_config, lora_state_dict
from petuner.as_lora import to_lora
from petuner.io import save_tensors
from tests.helpers import ADAPTERS, row_cfg, tiny_llama

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
CONVERTIBLE = sorted(n for n in ADAPTERS if ADAPTERS[n][2] and not isinstance(build_adapter(row_cfg(n)), QuantizedBase))
LORA_SHAPED = {"lora", "dylora", "sora", "block_lora", "loldu", "svfit", "lora_pissa", "merged"}


def adapted(name: str):
    model = tiny_llama()
    inject(model, build_adapter(row_cfg(name)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the (often identity) init
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def reloaded_logits(model, conversion, tmp_path) -> torch.Tensor:
    """The conversion written as the export writes it, reloaded by peft over a fresh base."""
    config = lora_config(conversion.factors, {}, "causal_lm", [], None)
    assert not config.use_rslora and not config.rank_pattern and not config.alpha_pattern
    config.save_pretrained(str(tmp_path))
    save_tensors(lora_state_dict(model, conversion.factors), tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()(input_ids=IDS).logits


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_every_conversion_reloads_in_peft_with_the_adapted_logits(name: str, tmp_path) -> None:
    """Untruncated (rank 64 holds every matrix of the tiny Llama): error 0 reported, logits within float noise."""
    model = adapted(name)
    conversion = to_lora(model, rank=None if name in LORA_SHAPED else 64)
    assert conversion.report["overall_relative_error"] <= 1e-6
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    assert (reloaded_logits(model, conversion, tmp_path) - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["lora", "merged", "svfit"])
def test_lora_shaped_conversion_is_the_layers_own_factors(name: str) -> None:
    model = adapted(name)
    conversion = to_lora(model)
    for module, layer in adapter_layers(model):
        view = layer.lora_view()
        assert torch.equal(conversion.factors[module].A, view.A) and torch.equal(conversion.factors[module].B, view.B)


def test_rslora_is_folded_into_plain_lora_alpha(tmp_path) -> None:
    model = adapted("lora_pissa")  # rsLoRA scaling, PiSSA's rank-2r view
    conversion = to_lora(model)
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    assert (reloaded_logits(model, conversion, tmp_path) - ours).abs().max() <= 1e-5
    r = conversion.report["rank"]
    assert r == 8 and conversion.report["lora_alpha"] == pytest.approx(8 / 4 ** 0.5 * 8)  # alpha/√4 at rank 8


@pytest.mark.parametrize(("name", "kw"), [("lora", {"rank": 2}), ("lora_dora", {"rank": 2}),
                                          ("peft_loha", {"energy": 0.9}), ("peft_vera", {"rank": 3})])
def test_reported_error_is_the_truncations_true_error(name: str, kw: dict) -> None:
    model = adapted(name)
    conversion = to_lora(model, **kw)
    assert conversion.report["rank"] == kw.get("rank", conversion.report["rank"])  # the rank asked for, no more
    lost = total = 0.0
    for module, layer in adapter_layers(model):
        with torch.no_grad():
            exact = layer.weight_update().float()
        f = conversion.factors[module]
        approx = f.scaling * f.B @ f.A
        err = ((exact - approx).norm() / exact.norm()).item()
        assert err == pytest.approx(conversion.report["matrices"][module]["relative_error"], abs=1e-4)
        lost, total = lost + (exact - approx).norm() ** 2, total + exact.norm() ** 2
    assert 0.01 < conversion.report["overall_relative_error"] == pytest.approx((lost / total).sqrt().item(), abs=1e-4)
    if "energy" in kw:  # each matrix keeps at least that share of its squared spectrum
        assert all(m["relative_error"] ** 2 <= 1 - kw["energy"] + 1e-6 for m in conversion.report["matrices"].values())


def test_export_as_lora_writes_the_report_and_rank(trained_run, tmp_path) -> None:
    from petuner.export import export

    out = export(trained_run, "peft", tmp_path / "p", as_lora=True, rank=3)
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "as_lora.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and report["rank"] == 3
    assert 0 < report["overall_relative_error"] < 1 and len(report["matrices"]) == 4
