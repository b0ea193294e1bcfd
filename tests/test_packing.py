"""Packing: a packed batch is the same training signal as the same examples padded, and the mask matters."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from petuner.adapters import build_adapter, inject
from petuner.data import build_data
from petuner.data.packing import PackedCollator, attend_within_examples, first_fit_decreasing, pack_examples
from petuner.models import load_model, load_tokenizer
from petuner.train.labelled_logits import keep_labelled_logits

from .conftest import make_cfg


def test_first_fit_decreasing_places_every_example_once_within_capacity() -> None:
    lengths = [5, 9, 3, 3, 7, 1, 10, 4, 2, 6]
    bins = first_fit_decreasing(lengths, 10, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert [[lengths[i] for i in b] for b in bins] == [[10], [9, 1], [7, 3], [6, 4], [5, 3, 2]]  # longest first
    assert first_fit_decreasing(lengths, 10, seed=0) == bins  # deterministic
    with pytest.raises(ValueError, match="more than a row"):
        first_fit_decreasing([11], 10, seed=0)


def test_packed_rows_restart_positions_and_hide_each_first_label() -> None:
    examples = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                                  {"input_ids": [4, 5], "labels": [4, 5]}])
    rows = pack_examples(examples, max_length=8, seed=0)
    assert len(rows) == 1
    row = rows[0]
    assert row["input_ids"] == [1, 2, 3, 4, 5]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [-100, 2, 3, -100, 5]  # 4 is not a target of 3's position
    batch = PackedCollator(pad_token_id=0)([row, {k: v[:2] for k, v in row.items()}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 2, -100, -100, -100]


def lora_model(cfg, labelled_logits: bool) -> torch.nn.Module:
    """The tiny model with LoRA whose B factors are random (at zero, A's gradients would all be zero)."""
    model = load_model(cfg.model)
    torch.manual_seed(0)
    inject(model, build_adapter(cfg.adapter), [])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    if labelled_logits:
        keep_labelled_logits(model)
    return model


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def batches(cfg, count: int) -> tuple[dict, dict]:
    """The same ``count`` SFT examples padded (the usual collator) and packed."""
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg.data, tokenizer, cfg.model.task)
    examples = [data.train[i] for i in range(count)]
    packed = pack_examples(Dataset.from_list(examples), int(cfg.data.max_length), seed=0)
    assert len(packed) < count  # rows really hold several examples
    return data.collate(examples), PackedCollator(tokenizer.pad_token_id)(list(packed))


def check_parity(cfg, labelled_logits: bool, count: int, atol: float) -> None:
    padded, packed = batches(cfg, count)
    model = lora_model(cfg, labelled_logits)
    attend_within_examples(model)
    model.train()
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=atol)
    assert grads.keys() == packed_grads.keys() and grads
    for name in grads:
        assert grads[name].abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("labelled_logits", [True, False])
def test_packed_batch_equals_padded_batch_tiny_llama(tmp_path, labelled_logits: bool, attn: str) -> None:
    cfg = make_cfg(tmp_path, "adapter=lora", "adapter.dropout=0", "data.max_length=128",
                   "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]", f"model.attn_implementation={attn}")
    check_parity(cfg, labelled_logits, count=12, atol=1e-5)


def test_flattened_rows_as_flash_attention_gets_them(tmp_path, monkeypatch) -> None:
    """Under flash_attention_2 the hook flattens the batch's real tokens into one row (transformers' varlen
    path needs batch size 1). The same flattening under sdpa (no GPU here) must give the same training signal.

    What this does NOT prove: ``AttendWithinExamples.__init__`` is replaced to force flattening, so neither
    that flash_attention_2 switches it on, nor that transformers' flash-attention kernel reads the example
    boundaries off the restarted position ids, is tested here. test_flash_attention_packing_on_cuda is."""
    from petuner.data import packing

    cfg = make_cfg(tmp_path, "adapter=lora", "adapter.dropout=0", "data.max_length=128")
    padded, packed = batches(cfg, 12)
    model = lora_model(cfg, labelled_logits=True).train()
    seen: list[torch.Size] = []
    model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True)
    monkeypatch.setattr(packing.AttendWithinExamples, "__init__", lambda self, model: setattr(self, "flatten", True))
    attend_within_examples(model)
    loss, grads = loss_and_grads(model, padded)
    flat_loss, flat_grads = loss_and_grads(model, packed)
    assert seen[-1] == (1, int(packed["attention_mask"].sum()))
    torch.testing.assert_close(flat_loss, loss, rtol=0, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(flat_grads[name], grads[name], rtol=0, atol=1e-5, msg=name)


def test_without_the_block_mask_the_loss_differs(tmp_path) -> None:
    """The same packed rows with the padding mask left in: transformers then sees no packing, every token
    attends to the earlier examples of its row, and the loss moves: the parity above is the mask's doing."""
    cfg = make_cfg(tmp_path, "adapter=lora", "adapter.dropout=0", "data.max_length=128")
    padded, packed = batches(cfg, 12)
    model = lora_model(cfg, labelled_logits=True).train()
    loss, _ = loss_and_grads(model, padded)
    naive, _ = loss_and_grads(model, packed)  # no attend_within_examples hook
    masked = copy.deepcopy(model)
    attend_within_examples(masked)
    proper, _ = loss_and_grads(masked, packed)
    torch.testing.assert_close(proper, loss, rtol=0, atol=1e-5)
    assert abs(float(naive) - float(loss)) > 50 * 1e-5  # a random model's guesses are flat: small, 50× the tolerance


@pytest.mark.gpu
def test_flash_attention_packing_on_cuda(tmp_path) -> None:
    """The real flash_attention_2 path: the hook chooses flattening by itself, and the flattened packed batch
    gives the padded batch's loss and gradients (both through flash attention, under bf16 autocast).
    The tolerances are bf16's: not yet measured on a GPU (none was lent while this was written)."""
    pytest.importorskip("flash_attn")
    from petuner.data.packing import AttendWithinExamples

    cfg = make_cfg(tmp_path, "adapter=lora", "adapter.dropout=0", "data.max_length=128",
                   "model.attn_implementation=flash_attention_2")
    padded, packed = batches(cfg, 12)
    model = lora_model(cfg, labelled_logits=True).cuda().train()
    assert AttendWithinExamples(model).flatten
    attend_within_examples(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, {k: v.cuda() for k, v in padded.items()})
        flat_loss, flat_grads = loss_and_grads(model, {k: v.cuda() for k, v in packed.items()})
    torch.testing.assert_close(flat_loss, loss, rtol=0, atol=2e-2)
    for name in grads:
        cosine = torch.nn.functional.cosine_similarity(flat_grads[name].flatten(), grads[name].flatten(), dim=0)
        assert cosine > 0.999, (name, float(cosine))


@pytest.mark.slow
def test_packed_batch_equals_padded_batch_smollm2(tmp_path) -> None:
    cfg = make_cfg(tmp_path, "model=smollm2_135m", "adapter=lora", "adapter.dropout=0", "data.max_length=128")
    check_parity(cfg, labelled_logits=True, count=8, atol=1e-5)


def test_packed_run_trains(cfg_factory) -> None:
    from petuner.run import run

    info = run(cfg_factory("data.packing=true", "data.max_length=256", "trainer.max_steps=3"))
    # 64 training examples went into a few rows; run.json counts examples as examples (seen failing before #29:
    # train_examples was the row count, while data.train_examples said 64)
    assert info["train_examples"] == info["data"]["train_examples"] == 64 and info["eval_examples"] == 32
    assert info["train_rows"] < 64 / 3 and info["eval_rows"] < 32 / 3
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
