"""Mixture of experts: the router's auxiliary loss trains at the model's coefficient and is reported apart from the
language-model loss; LoRA on the fused expert weights through peft's ``target_parameters``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from petuner.errors import ConfigError
from petuner.train.router_loss import route_losses

from .test_families import family_cfg

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
EXPERTS = ("adapter=peft", "adapter.peft_type=LORA", "~adapter.config.alpha", "+adapter.config.lora_alpha=8",
           "adapter.config.r=4", "adapter.config.target_modules=[]")


def test_training_adds_the_aux_loss_at_the_configured_coefficient_and_evaluation_reports_it_apart() -> None:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.05, initializer_range=0.2)
    plain = MixtralForCausalLM(config)
    ours = copy.deepcopy(plain)
    assert route_losses(ours)
    with torch.no_grad():
        lm = plain(input_ids=IDS, labels=IDS).loss
        with_aux = plain(input_ids=IDS, labels=IDS, output_router_logits=True)
        ours.train()
        trained = ours(input_ids=IDS, labels=IDS).loss
        ours.eval()
        held_out = ours(input_ids=IDS, labels=IDS)
    assert with_aux.loss - lm == pytest.approx(0.05 * float(with_aux.aux_loss), rel=1e-4)  # what "with aux" means
    torch.testing.assert_close(trained, with_aux.loss, rtol=1e-6, atol=0)  # training: LM + 0.05 · aux
    torch.testing.assert_close(held_out.loss, lm, rtol=1e-6, atol=0)      # evaluation: the LM loss
    torch.testing.assert_close(held_out.aux_loss, with_aux.aux_loss)      # ... and the aux loss beside it


def test_lora_on_fused_expert_parameters_trains_and_merges(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from petuner.export import export
    from petuner.run import run
    from petuner.run_folder import load

    cfg = family_cfg("mixtral", tmp_path / "run", *EXPERTS,
                     "+adapter.config.target_parameters=[experts.gate_up_proj,experts.down_proj]")
    info = run(cfg)
    assert [t.split(".mlp.")[-1] for t in info["targets"]] == ["experts", "experts"]  # one per layer
    # per layer: r·E rows of A and columns of B on gate_up (64 → 2·128) and down (128 → 64); nothing else trains
    assert info["trainable_parameters"] == 2 * (4 * 4 * (64 + 2 * 128) + 4 * 4 * (128 + 64))
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    merged = AutoModelForCausalLM.from_pretrained(export(cfg.run_dir, "merged", tmp_path / "merged")).eval()
    ids = torch.randint(1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = load(cfg.run_dir).model(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_target_parameters_matching_nothing_is_one_line_listing_the_expert_parameters(tmp_path: Path) -> None:
    from petuner.run import run

    cfg = family_cfg("mixtral", tmp_path / "run", *EXPERTS, "+adapter.config.target_parameters=[experts.w1]")
    with pytest.raises(ConfigError, match=r"target_parameters=\['experts.w1'\] matches no parameter of "
                                          r"MixtralForCausalLM; its 3-D \(expert\) parameters are: .*gate_up_proj"):
        run(cfg)
