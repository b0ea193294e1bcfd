"""Helpers shared by several test modules (tests import them from here, never from each other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from petuner.config import compose_config
from petuner.data.preference import PairCollator
from petuner.data.sft import IGNORE
from petuner.train.logging import read_metrics

# The 48 pairs of tests/data/pairs.jsonl (8 held out), and DPO on them: the distributed and compiled checks' runs
PAIRS = ("data=hf", f"data.path={Path(__file__).parent / 'data' / 'pairs.jsonl'}", "data.eval_size=8")
DPO = ("loss=dpo", *PAIRS)
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def lora_cfg(**kw):
    base = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
            "scaling": "standard", "bias": "none"}
    return OmegaConf.create({**base, **kw})


def shipped(group: str, name: str, *overrides: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` as composed for ``model=tiny_llama`` (interpolations resolved), with
    ``overrides`` (``key=value`` within the group) applied: the shipped values, not a restatement."""
    cfg = compose_config(["model=tiny_llama", f"{group}={name}", "run_dir=.",
                          *(f"{group}.{o}" for o in overrides)])
    node = OmegaConf.to_container(cfg[group], resolve=True)
    assert isinstance(node, dict)
    return node


def shipped_cfg(group: str, name: str, /, *overrides: str, **values: Any) -> DictConfig:
    """``shipped`` as a plain (unchecked) DictConfig, with ``values`` merged in as given."""
    return OmegaConf.create({**shipped(group, name, *overrides), **values})


def batches(n: int, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(n)]


def pair_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three pairs of random tokens (a shared prompt, completions of different lengths) through petuner's collator."""
    g = torch.Generator().manual_seed(seed)

    def side(prompt: list[int], longest: int) -> tuple[list[int], list[int]]:
        reply = torch.randint(3, 128, (int(torch.randint(2, longest, (1,), generator=g)),), generator=g).tolist()
        return prompt + reply, [IGNORE] * len(prompt) + reply

    rows = []
    for n in torch.randint(3, 7, (3,), generator=g).tolist():
        prompt = torch.randint(3, 128, (n,), generator=g).tolist()
        (ids, labels), (r_ids, r_labels) = side(prompt, 6), side(prompt, 7)
        rows.append({"input_ids": ids, "labels": labels, "rejected_input_ids": r_ids, "rejected_labels": r_labels})
    return PairCollator(pad_token_id=2)(rows)


def dpo_runs_match(expected: Path, actual: Path, loss_rel: float, rewards_abs: float, accuracies: bool = True) -> None:
    """Two DPO runs log the same losses (relative) and rewards (absolute: a reward is beta times a difference of
    two log-probabilities, so it carries their rounding, not its own) at every step and evaluation, and with
    ``accuracies`` the same share of positive margins (not where kernels differ: at step 0 every margin is 0, and
    rounding flips it); the rewards move off zero (the reference is not the policy)."""
    logged = [read_metrics(d) for d in (expected, actual)]
    names = ("loss", *REWARDS, *(["rewards/accuracies"] if accuracies else []))
    for key in (f"{split}/{name}" for split in ("train", "eval") for name in names):
        want, got = ([m[key] for m in ms if key in m] for ms in logged)
        assert want and len(got) == len(want), key
        tolerance = {"rel": loss_rel} if key.endswith("loss") else {"abs": rewards_abs, "rel": 0}
        assert got == pytest.approx(want, **tolerance), key
    assert any(m.get("train/rewards/margins") for m in logged[1]), "every reward zero: no reference"


def train(model, optimizer, data) -> list[float]:
    losses = []
    model.train()
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def exports_reload(run_dir, tmp_path, peft_ok: bool = True) -> dict | None:
    """Export ``run_dir`` merged (and as peft); each reload must give petuner's logits. Returns the peft config."""
    import peft
    from transformers import AutoModelForCausalLM

    import petuner
    from petuner.export import export
    from petuner.models import load_model
    from petuner.run_folder import read_config

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model, _ = petuner.load(run_dir)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = load_model(read_config(run_dir).model).eval()
        assert (ours - base(input_ids=ids).logits).abs().max() > 1e-5  # the adapter changes the model
    merged = AutoModelForCausalLM.from_pretrained(export(run_dir, "merged", tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ours).abs().max() <= 1e-4
    if not peft_ok:
        return None
    out = export(run_dir, "peft", tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(load_model(read_config(run_dir).model), str(out)).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ours).abs().max() <= 1e-5
    return json.loads((out / "adapter_config.json").read_text())


# row → (YAML in conf/adapter/, overrides of its shipped values, modules it must wrap in the tiny Llama).
# The YAMLs are composed as shipped (target_modules: the tiny Llama's lora_targets, q_proj and v_proj);
# only sizes shrink, and dropout goes to zero where the row compares outputs exactly.
QV = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
SMALL = ("r=4", "alpha=8", "dropout=0.0")
ADAPTERS = {
    "lora": ("lora", SMALL, QV),
    "none": ("none", (), []),
    "dylora": ("dylora", SMALL, QV),
    "sora": ("sora", SMALL, QV),
    "qlora": ("qlora", SMALL, QV),
    "lq_lora": ("lq_lora", (*SMALL, "bits=3", "iterations=3", "calibration_batches=1"), QV),
    "lora_dora": ("lora", (*SMALL, "variant=dora"), QV),
    "lora_pissa": ("lora", (*SMALL, "scaling=rslora", "init=pissa"), QV),
    "block_lora": ("block_lora", (*SMALL, "n_blocks=4"), QV),
    "loldu": ("loldu", ("r=4", "alpha=4"), QV),
    "svfit": ("svfit", ("r=4",), QV),
    "merged": ("merged", ("r=4",), QV),
    # no sources read here: the LoRA beside alone (the composition itself: tests/test_atlas.py)
    "atlas": ("atlas", ("lora_r=4", "lora_alpha=8", "target_modules=[q_proj,v_proj]"), QV),
    # peft's own tuners through adapter=peft (the ready configs adapter=loha / adalora / vera)
    "peft": ("peft", ("config.r=4", "config.alpha=8"), QV),
    "peft_loha": ("loha", ("config.r=4", "config.alpha=8"), QV),
    "peft_adalora": ("adalora", ("config.init_r=4", "config.target_r=2", "config.total_step=10",
                                "config.lora_dropout=0.0"), QV),
    "peft_vera": ("vera", ("config.r=8",), QV),
}


def row_cfg(name: str) -> dict:
    yaml, overrides, _ = ADAPTERS[name]
    return shipped("adapter", yaml, *overrides)


def perturbed_run(source, dest, seed: int, **adapter: Any):
    """A run folder on ``source``'s base without training: its config with ``adapter`` options changed, the
    adapter freshly built and every adapter tensor moved off its init by seeded noise (merging and composing
    need runs with distinct, non-trivial updates, not trained ones)."""
    import shutil

    from safetensors.torch import save_file

    from petuner.adapters import adapter_layers, adapter_state_dict
    from petuner.run_folder import build_base_with_adapter, read_config, read_info

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoints", "best", "adapter.safetensors",
                                                                 "petuner_manifest.json"))
    cfg = read_config(source)
    cfg.adapter = OmegaConf.merge(cfg.adapter, adapter)
    OmegaConf.save(cfg, dest / "config.yaml")
    model, _ = build_base_with_adapter(cfg, read_info(source))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, dest / "adapter.safetensors")
    return dest
