"""QLoRA: a LoRA over bitsandbytes' NF4 base (double quantization), training and exports."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

import petuner
from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.adapters.qlora import NF4_BITS_PER_PARAM
from petuner.export import export
from petuner.models import load_model
from petuner.run import run
from tests.helpers import tiny_llama


def qlora_cfg(**kw):
    base = {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
            "scaling": "standard", "bias": "none"}
    return OmegaConf.create({**base, **kw})


def test_base_is_bitsandbytes_nf4_with_double_quantization_plus_a_lora() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject(model, build_adapter(qlora_cfg()))
    g = torch.Generator().manual_seed(0)
    for name, layer in adapter_layers(model):
        weight = layer.base_layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8
        assert weight.quant_type == "nf4" and weight.quant_state.nested and weight.quant_state.blocksize == 64
        original = base.get_submodule(name).weight
        packed, state = bnb.functional.quantize_4bit(original.detach(), blocksize=64, compress_statistics=True,
                                                     quant_type="nf4")
        torch.testing.assert_close(layer.base_weight(), bnb.functional.dequantize_4bit(packed, state), atol=0, rtol=0)
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
            x = torch.randn(3, layer.in_features, generator=g)
            expected = torch.nn.functional.linear(x, layer.base_weight()) + \
                layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert NF4_BITS_PER_PARAM == 4 + 8 / 64 + 32 / (64 * 256)


def test_gradients_equal_a_lora_on_the_dequantized_base_even_after_an_eval_forward() -> None:
    model = tiny_llama()
    inject(model, build_adapter(qlora_cfg()))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()(input_ids=ids)  # bitsandbytes may repack its CPU weights here
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    reference = tiny_llama()  # the same model in plain fp32: dequantized base + petuner's LoRA
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            reference.get_submodule(name).weight.copy_(layer.base_weight())
    inject(reference, build_adapter(OmegaConf.create({**qlora_cfg(), "name": "lora"})))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    ours, theirs = model.train()(input_ids=ids, labels=ids), reference.train()(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads and all(p.grad is not None for n, p in model.named_parameters() if n in grads)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)


def test_run_trains_and_its_exports_match_the_adapter_model(cfg_factory, tmp_path, caplog) -> None:
    cfg = cfg_factory("adapter=qlora", "adapter.r=4")
    info = run(cfg)
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded, _ = petuner.load(cfg.run_dir)
    with torch.no_grad():
        ours = loaded(input_ids=ids).logits
    with caplog.at_level("INFO", logger="petuner.export"):
        out = export(cfg.run_dir, "merged", tmp_path / "merged")
    assert "full precision" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ours).abs().max() <= 1e-4
    peft_out = export(cfg.run_dir, "peft", tmp_path / "peft")
    assert "NF4" in (peft_out / "README.md").read_text()
    base = load_model(cfg.model)  # the NF4 base, dequantized: what the factors were trained on
    with torch.no_grad():
        for name, layer in adapter_layers(loaded):
            base.get_submodule(name).weight.copy_(layer.base_weight())
    reloaded = PeftModel.from_pretrained(base, str(peft_out)).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ours).abs().max() <= 1e-5
