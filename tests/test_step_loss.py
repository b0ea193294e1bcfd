"""The loss of an optimizer step is the mean over all its labelled items, however the batch is split."""

from __future__ import annotations

import pytest
import torch

from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.data import build_data
from petuner.models import head_modules, load_model, load_tokenizer
from petuner.train.device import grad_scaler
from petuner.train.labelled_logits import install_output_path
from petuner.train.loop import Loop, labelled_items

CASES = {
    "causal_lm": ("adapter.dropout=0",),
    "causal_lm, no labelled logits": ("adapter.dropout=0", "trainer.labelled_logits=false"),
    "causal_lm, whole output layer": ("adapter.dropout=0", "trainer.labelled_logits=false", "trainer.loss_chunk=null"),
    "classification": ("model=tiny_bert", "data=bbc_news", "data.eval_size=16", "adapter.dropout=0"),
}


def step_gradients(cfg, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
    """The gradients of the run's first optimizer step, through the loop's own accumulation."""
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg.data, tokenizer, cfg.model.task)
    torch.manual_seed(0)
    model = load_model(cfg.model, data.num_labels)
    inject(model, build_adapter(cfg.adapter), head_modules(model, cfg.model.task))
    for _, layer in adapter_layers(model):  # B = 0 would leave A without a gradient
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    install_output_path(model, cfg.trainer, cfg.model.task)  # as a run does (loss_chunk's default included)
    model.eval()  # no dropout (BERT's hidden dropout): the two splits must see the same function
    trainer = cfg.trainer.copy()
    trainer.batch_size, trainer.grad_accum = batch_size, grad_accum
    loop = Loop(model=model, data=data, optimizer=None, scheduler=None, scaler=grad_scaler(torch.device("cpu"), None),
                hooks=[], cfg=trainer, device=torch.device("cpu"), compute_dtype=None, run_dir=None, metrics=None)
    micro = next(loop.step_batches(0))
    assert len(micro) == grad_accum
    loop.accumulate(micro)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_8_equals_batch_2_times_4_accumulated(cfg_factory, case: str) -> None:
    cfg = cfg_factory(*CASES[case])
    whole, split = step_gradients(cfg, 8, 1), step_gradients(cfg, 2, 4)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_items_are_labelled_positions_after_the_shift_or_examples() -> None:
    labels = torch.tensor([[5, -100, 7, 8], [-100, -100, 3, -100]])
    assert labelled_items({"labels": labels}, "causal_lm") == 3  # the first position never is a target
    assert labelled_items({"labels": torch.tensor([0, 2, 1])}, "classification") == 3
