"""Logits at labelled positions only: transformers' loss and gradients, with a smaller output layer call."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from petuner.run import run
from petuner.train.labelled_logits import keep_labelled_logits


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def sft_batch() -> dict[str, torch.Tensor]:
    """Three rows: a prompt without loss, an answer with loss, then right padding (as petuner's SFT data)."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row, (prompt, length) in enumerate([(4, 12), (7, 10), (2, 6)]):
        labels[row, :prompt] = -100
        labels[row, length:] = -100
        attention_mask[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model: torch.nn.Module, batch: dict, **kwargs) -> tuple[torch.Tensor, dict, torch.Tensor]:
    model.zero_grad()
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.logits


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_every_gradient_equal_transformers(tied: bool) -> None:
    plain = llama(tied).train()
    fast = copy.deepcopy(plain)
    assert keep_labelled_logits(fast) is not None
    batch = sft_batch()
    loss, grads, logits = loss_and_grads(plain, batch)
    fast_loss, fast_grads, fast_logits = loss_and_grads(fast, batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert logits.shape == (3, 12, 128)
    assert fast_logits.shape == (labelled, 128)  # the output layer saw the labelled positions only
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == fast_grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_num_items_in_batch_sums_like_transformers() -> None:
    plain = llama(tied=False)
    fast = copy.deepcopy(plain)
    keep_labelled_logits(fast)
    batch, total = sft_batch(), torch.tensor(40)
    loss, _, _ = loss_and_grads(plain, batch, num_items_in_batch=total)
    fast_loss, _, _ = loss_and_grads(fast, batch, num_items_in_batch=total)
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=1e-6)


def test_without_labels_the_model_is_unchanged() -> None:
    plain = llama(tied=False).eval()
    fast = copy.deepcopy(plain)
    keep_labelled_logits(fast)
    batch = {k: v for k, v in sft_batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(fast(**batch).logits, plain(**batch).logits)
        # a labelled forward in between leaves nothing behind for the next one
        fast(**sft_batch())
        assert fast(**batch).logits.shape == (3, 12, 128)


@pytest.mark.parametrize("adapter", ["adapter=lora", "adapter=adalora"])
def test_a_run_trains_the_same_with_and_without(cfg_factory, tmp_path, adapter: str) -> None:
    """Whole runs agree: labelled logits with the chunked loss (chunks of 4) against transformers' own output
    layer and loss, including AdaLoRA, whose orthogonal regulariser is added to the model's loss."""
    runs = {}
    for flag in ("true", "false"):  # false: transformers' own output layer and loss, whole
        chunk = "trainer.loss_chunk=null" if flag == "false" else "trainer.loss_chunk=4"
        run(cfg_factory(adapter, "trainer.max_steps=3", f"trainer.labelled_logits={flag}", chunk,
                        run_dir=tmp_path / flag))
        lines = (tmp_path / flag / "metrics.jsonl").read_text().splitlines()
        runs[flag] = [m[key] for m in map(json.loads, lines) for key in ("train/loss", "eval/loss") if key in m]
    assert len(runs["true"]) == 5  # two evaluations and three steps
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5)


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_every_gradient_equal_transformers(tied: bool, labelled: bool) -> None:
    """Chunks of 4 positions (the batch has 33 scored positions): every chunk's logits are recomputed in backward."""
    plain = llama(tied).train()
    chunked = copy.deepcopy(plain)
    assert keep_labelled_logits(chunked, labelled=labelled, chunk=4) is not None
    batch = sft_batch()
    loss, grads, _ = loss_and_grads(plain, batch)
    chunk_loss, chunk_grads, chunk_logits = loss_and_grads(chunked, batch)
    assert chunk_logits is None  # no tokens × vocabulary tensor was handed out
    torch.testing.assert_close(chunk_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == chunk_grads.keys()
    for name in grads:
        torch.testing.assert_close(chunk_grads[name], grads[name], rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: a loop over chunks, same value
        torch.testing.assert_close(chunked(**batch).loss, plain(**batch).loss, rtol=0, atol=1e-6)


def test_fused_output_layer_with_a_bias_equals_the_plain_one() -> None:
    """The fused path's every gradient (hidden states, weight, bias), with ignored positions, a chunk of nothing
    but them and a last short chunk."""
    from torch.nn import functional as F

    from petuner.train.chunked_loss import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (10,), generator=g)
    targets[2] = targets[4:8] = -100  # one ignored position, and a whole chunk of them
    fused = LinearCrossEntropy.apply(hidden, weight, bias, targets, 4)
    fused_grads = torch.autograd.grad(fused * 3, (hidden, weight, bias))
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100, reduction="sum")
    plain_grads = torch.autograd.grad(plain * 3, (hidden, weight, bias))
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    for name, got, want in zip(("hidden", "weight", "bias"), fused_grads, plain_grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


def test_fused_output_layer_keeps_a_confident_tokens_gradient_under_bf16() -> None:
    """p - 1 for a token predicted at p ≈ 0.9999 is formed in fp32 before the bf16 matmul, as transformers'
    path does: subtracting the one-hot after the matmul left errors of 37% of the gradient here (now 0.6%)."""
    from torch.nn import functional as F

    from petuner.train.chunked_loss import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 16, generator=g)
    hidden = 4 * hidden / hidden.norm(dim=1, keepdim=True)
    weight = torch.randn(32, 16, generator=g) * 0.1
    targets = torch.arange(6)
    weight[:6] += 0.8 * hidden  # the target's logit ≈ 0.8 · |h|² ≈ 13, the others ≈ ±1
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # transformers' path: bf16 logits, fp32 loss and p - 1
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        reference = torch.autograd.grad(plain, hidden)[0]
        fused = torch.autograd.grad(LinearCrossEntropy.apply(hidden, weight, None, targets, 4), hidden)[0]
    assert F.softmax(F.linear(hidden, weight), -1)[torch.arange(6), targets].min() > 0.999
    assert (fused - reference).abs().max() < 0.02 * reference.abs().max()


def test_chunked_logits_are_never_all_alive(monkeypatch) -> None:
    """The output layer only ever produces ``chunk`` rows of logits, all chunks into the same memory, and
    backward recomputes none of them."""
    from petuner.train import chunked_loss

    rows: list[int] = []
    buffers: set[int] = set()
    mm = chunked_loss.torch.mm
    model = llama(tied=True).train()

    def spy(a, b, *, out=None):
        if b._base is model.lm_head.weight:
            rows.append(a.shape[0])
            buffers.add(out.data_ptr())
        return mm(a, b, out=out)

    monkeypatch.setattr(chunked_loss.torch, "mm", spy)
    keep_labelled_logits(model, labelled=False, chunk=8)
    model(**sft_batch()).loss.backward()
    assert rows == [8, 8, 8, 8, 1]  # 33 positions, each once
    assert len(buffers) == 1


def test_evaluation_never_builds_the_whole_logits(monkeypatch) -> None:
    """Under no_grad a labelled forward runs the output layer EVAL_CHUNK positions at a time, with
    transformers' loss; with gradients on (no trainer.loss_chunk) it is one call, as before."""
    from petuner.train import chunked_loss, labelled_logits

    monkeypatch.setattr(labelled_logits, "EVAL_CHUNK", 8)
    plain = llama(tied=False).eval()
    fast = copy.deepcopy(plain)
    keep_labelled_logits(fast)
    batch, rows = sft_batch(), []
    linear = chunked_loss.F.linear

    def spy(x, weight, bias=None):
        if weight is fast.lm_head.weight:
            rows.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(chunked_loss.F, "linear", spy)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        out = fast(**batch)
        torch.testing.assert_close(out.loss, plain(**batch).loss, rtol=0, atol=1e-6)
    assert out.logits is None
    assert rows == [8] * (labelled // 8) + [labelled % 8]
    rows.clear()
    fast(**batch).loss.backward()
    assert rows == [labelled]


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path() -> None:
    """Under autocast the output layer is cast once for all chunks; loss and gradients stay those of
    transformers' path under the same autocast (bf16 rounding apart)."""
    plain = llama(tied=False).train()
    chunked = copy.deepcopy(plain)
    keep_labelled_logits(chunked, chunk=4)
    batch = sft_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, _ = loss_and_grads(plain, batch)
        chunk_loss, chunk_grads, _ = loss_and_grads(chunked, batch)
    torch.testing.assert_close(chunk_loss, loss, rtol=0, atol=2e-2)
    for name in grads:
        torch.testing.assert_close(chunk_grads[name], grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_capped_logits_keep_the_output_layer_whole() -> None:
    """Gemma 2 soft-caps its logits between the output layer and the loss: chunking would skip the cap, so
    such a model keeps the labelled selection but not the chunks, in training and in evaluation."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                          final_logit_softcapping=0.5)  # a cap small enough to change every loss
    plain = Gemma2ForCausalLM(config).train()
    fast = copy.deepcopy(plain)
    keep_labelled_logits(fast, chunk=4)
    batch = sft_batch()
    torch.testing.assert_close(fast(**batch).loss, plain(**batch).loss, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch).loss, plain(**batch).loss, rtol=0, atol=1e-6)


class Wrapped(torch.nn.Module):
    """An output layer that is not a plain nn.Linear (as an adapter on it would be)."""

    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1.5


@pytest.mark.parametrize("labelled", [True, False])
def test_chunked_loss_of_any_output_module_recomputes_and_matches(labelled: bool) -> None:
    plain = llama(tied=False).train()
    plain.lm_head = Wrapped(plain.lm_head)
    chunked = copy.deepcopy(plain)
    keep_labelled_logits(chunked, labelled=labelled, chunk=4)
    loss, grads, _ = loss_and_grads(plain, sft_batch())
    chunk_loss, chunk_grads, _ = loss_and_grads(chunked, sft_batch())
    torch.testing.assert_close(chunk_loss, loss, rtol=0, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(chunk_grads[name], grads[name], rtol=0, atol=1e-6, msg=name)
