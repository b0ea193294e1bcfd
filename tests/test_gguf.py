"""GGUF export: the file reloaded by transformers (``gguf_file=``) gives the merged export's logits and the
run's tokenizer and chat template; architectures it cannot write are one line."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petuner.errors import PetunerError
from petuner.export import export
from petuner.gguf_export import permute_rotary

IDS = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
# Largest |logit difference| / max |logit| allowed against the merged export. f32 is exact up to float
# rounding; f16 and q8_0 were measured on this run at 4.6e-4 and 1.2e-2 (docs/after-training.md: SmolLM2-135M figures).
TOLERANCE = {"f32": None, "f16": 1e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def merged_logits(trained_run, tmp_path_factory) -> torch.Tensor:
    merged = export(trained_run, "merged", tmp_path_factory.mktemp("merged") / "m")
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=IDS).logits


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_gguf_reloads_with_the_merged_logits(trained_run, merged_logits, tmp_path, dtype: str) -> None:
    out = export(trained_run, "gguf", tmp_path / "model.gguf", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (model(input_ids=IDS).logits - merged_logits).abs().max().item()
    scale = merged_logits.abs().max().item()
    if dtype == "f32":
        assert diff <= 1e-4
    else:
        assert 0 < diff <= TOLERANCE[dtype] * scale  # quantized: close, but not the f32 weights themselves


def test_gguf_carries_the_tokenizer_and_chat_template(trained_run, tmp_path) -> None:
    import petuner

    out = export(trained_run, "gguf", tmp_path / "model.gguf", dtype="f32")
    _, ours = petuner.load(trained_run)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    texts = ["Hello there, how are you?  two  spaces\n\nnewlines 123 émoji 😀",
             ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)]
    assert [theirs(t)["input_ids"] for t in texts] == [ours(t)["input_ids"] for t in texts]
    assert theirs.chat_template == ours.chat_template
    assert (theirs.bos_token, theirs.eos_token) == (ours.bos_token, ours.eos_token)


def test_rotary_permutation_is_the_one_transformers_reverses() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.arange(8 * 4 * 3, dtype=torch.float32).reshape(8 * 4, 3)  # 4 heads of 8 rows
    permuted = permute_rotary(weight, 4)
    assert not torch.equal(permuted, weight)
    restored = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted.numpy(), 4, 4)
    assert torch.equal(torch.from_numpy(restored), weight)


def test_gguf_export_of_an_encoder_is_one_line(trained_cls_run, tmp_path) -> None:
    with pytest.raises(PetunerError, match=r"writes causal language models of the families llama, .* seq_cls bert"):
        export(trained_cls_run, "gguf", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
