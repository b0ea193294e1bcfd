"""adapter=peft: peft's own tuners in petuner's loop — same outputs as peft's PeftModel, AdaLoRA's rank
allocation through a hook, one-line config errors, exports reloaded by peft and transformers."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from omegaconf import OmegaConf

from petuner.adapters import adapter_layers, build_adapter, disabled_adapters, inject, trainable_parameters, unload
from petuner.adapters.peft_tuner import AdaLoRAHook
from petuner.errors import ConfigError
from petuner.run import run
from petuner.train.hooks import TrainState
from tests.helpers import exports_reload, tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
QV = ["q_proj", "v_proj"]


def peft_cfg(peft_type: str, **config):
    return OmegaConf.create({"name": "peft", "peft_type": peft_type, "config": {"target_modules": QV, **config}})


@pytest.mark.parametrize("peft_type, config", [
    ("LOHA", {"r": 4, "alpha": 8}),
    ("LOKR", {"r": 4, "alpha": 8}),
    ("VERA", {"r": 8}),
    ("IA3", {"feedforward_modules": []}),
    ("ADALORA", {"init_r": 4, "target_r": 2, "total_step": 10}),
])
def test_same_outputs_and_gradients_as_peft(peft_type: str, config: dict) -> None:
    base = tiny_llama()
    ours = copy.deepcopy(base)
    method = build_adapter(peft_cfg(peft_type, **config))
    inject(ours, method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(ours).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs = peft.get_peft_model(copy.deepcopy(base), method.build_config(task_type="CAUSAL_LM"))
    for name, layer in adapter_layers(ours):
        theirs.base_model.model.get_submodule(name).load_state_dict(layer.tuner.state_dict())
    ours.train(), theirs.train()  # no dropout in these configs; AdaLoRA's penalty is a training term
    out_ours, out_theirs = ours(input_ids=IDS, labels=IDS), theirs(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-6, rtol=0)  # AdaLoRA: + orth. penalty
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                    if p.requires_grad}
    ours_grads = {n.replace(".tuner.", "."): p.grad for n, p in trainable_parameters(ours).items()}
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_adalora_penalty_trains_but_stays_out_of_the_held_out_loss() -> None:
    from petuner.adapters.peft_tuner import orthogonal_regularization

    model = tiny_llama()
    inject(model, build_adapter(peft_cfg("ADALORA", init_r=4, target_r=2, total_step=10, orth_reg_weight=0.5)))
    logits = model(input_ids=IDS).logits
    task_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
    penalty = 0.5 * orthogonal_regularization(model)
    assert penalty > 1e-3
    torch.testing.assert_close(model(input_ids=IDS, labels=IDS).loss, task_loss)  # eval mode
    model.train()
    torch.testing.assert_close(model(input_ids=IDS, labels=IDS).loss, task_loss + penalty)


@pytest.mark.parametrize("peft_type, config", [
    ("IA3", {"feedforward_modules": []}),  # multiplicative: merge scales W's columns
    ("OFT", {"r": 0, "oft_block_size": 8}),  # a rotation of W
    ("MISS", {"r": 8}),
    ("HRA", {"r": 8}),
])
def test_other_tuners_merge_disable_and_unload(peft_type: str, config: dict) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject(model, build_adapter(peft_cfg(peft_type, **config)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        unmerged = model(input_ids=IDS).logits
        assert (unmerged - base(input_ids=IDS).logits).abs().max() > 1e-3
        with disabled_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-5, rtol=0)
        for _, layer in adapter_layers(model):  # ΔW is what peft's merge adds, whatever the tuner's algebra
            dense = copy.deepcopy(layer.base_layer)
            dense.weight += layer.delta_weight()
            x = torch.randn(3, layer.in_features)
            torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)
        plain = unload(model)
        assert not list(adapter_layers(plain))
        torch.testing.assert_close(plain(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


def test_adalora_hook_prunes_ranks_as_peft_does() -> None:
    """Two copies stepped the same way: one by AdaLoRAHook around an optimizer step, one by peft's loop."""
    config = {"init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 1, "deltaT": 1, "total_step": 6}
    base = tiny_llama()
    ours = copy.deepcopy(base)
    method = build_adapter(peft_cfg("ADALORA", **config))
    inject(ours, method)
    theirs = peft.get_peft_model(copy.deepcopy(base), method.build_config(task_type="CAUSAL_LM"))
    for name, layer in adapter_layers(ours):
        theirs.base_model.model.get_submodule(name).load_state_dict(layer.tuner.state_dict())
    ours.train(), theirs.train()  # as in training: the orthogonal penalty is on
    opt_ours = torch.optim.SGD(list(trainable_parameters(ours).values()), lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    [hook] = method.hooks(ours)
    assert isinstance(hook, AdaLoRAHook)
    state = TrainState(model=ours, optimizer=opt_ours, max_steps=6)
    for step in range(6):
        hook.before_step(state)
        ours(input_ids=IDS, labels=IDS).loss.backward()
        hook.after_backward(state)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        state.step += 1
        hook.after_optimizer_step(state)

        theirs(input_ids=IDS, labels=IDS).loss.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad(set_to_none=True)
    theirs_params = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters()}
    for name, p in trainable_parameters(ours).items():
        torch.testing.assert_close(p, theirs_params[name.replace(".tuner.", ".")], atol=1e-5, rtol=1e-4)
    kept = sum(int(torch.count_nonzero(layer.tuner.lora_E["default"])) for _, layer in adapter_layers(ours))
    assert kept == 4  # the budget: target_r (1) × 4 layers, from init_r 4 × 4
    # the allocator's state survives a checkpoint round trip
    fresh = AdaLoRAHook(method.tuner_model, total_step_from_run=False)
    fresh.load_state_dict(hook.state_dict())
    assert fresh.config.rank_pattern == hook.config.rank_pattern


@pytest.mark.parametrize("cfg, message", [
    ({"peft_type": "LOHAA", "config": {"target_modules": QV}}, r"adapter.peft_type='LOHAA': allowed: ADALORA, .*LOHA"),
    ({"peft_type": "LOHA", "config": {"target_modules": QV, "rank": 4}},
     r"adapter.config.rank is not an argument of peft's LoHaConfig; allowed: .*alpha"),
    ({"peft_type": "LOHA", "config": {"r": 4}}, r"adapter.config.target_modules is missing"),
    ({"peft_type": "ADALORA", "config": {"target_modules": QV, "total_step": 5, "tinit": 5}},
     r"adapter.config is rejected by peft's AdaLoraConfig: The supplied schedule values"),
    ({"peft_type": "LOHA", "config": 3}, r"adapter.config=3: must be a mapping of LoHaConfig arguments"),
])
def test_config_errors_are_one_line(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_adapter(OmegaConf.create({"name": "peft", **cfg}))
    assert "\n" not in str(err.value)


def test_targets_matching_nothing_is_petuners_one_line_error() -> None:
    with pytest.raises(ConfigError, match=r"matches no linear layer in LlamaForCausalLM"):
        inject(tiny_llama(), build_adapter(peft_cfg("LOHA", target_modules=["qproj"])))


@pytest.mark.parametrize("adapter", ["loha", "vera", "adalora"])
def test_ready_configs_train_and_export(adapter: str, cfg_factory, tmp_path) -> None:
    info = run(cfg_factory(f"adapter={adapter}", "trainer.max_steps=4"))
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"]
    config = exports_reload(tmp_path / "run", tmp_path)
    assert config["peft_type"] == OmegaConf.load(f"conf/adapter/{adapter}.yaml").peft_type


def test_command_line_peft_type_and_config(cfg_factory, tmp_path) -> None:
    cfg = cfg_factory("adapter=peft", "adapter.peft_type=LOKR",
                      "adapter.config={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", "trainer.max_steps=2")
    run(cfg)
    config = exports_reload(tmp_path / "run", tmp_path)
    assert config["peft_type"] == "LOKR" and config["r"] == 4


def test_adalora_resumes_exactly(resume_check) -> None:
    """The rank allocator's state travels in the checkpoint: a resumed run prunes as an uninterrupted one."""
    from safetensors.torch import load_file

    straight_dir, _ = resume_check("adapter=adalora", "adapter.config.init_r=4", "adapter.config.target_r=2",
                                   "adapter.config.tinit=1", "adapter.config.tfinal=2", "trainer.max_steps=6")
    straight = load_file(straight_dir / "adapter.safetensors")
    pruned = [t for k, t in straight.items() if "lora_E" in k]
    assert sum(int(torch.count_nonzero(t)) for t in pruned) == 2 * len(pruned)  # target_r on average
