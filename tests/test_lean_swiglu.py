"""trainer.lean_swiglu: the same losses and gradients, one intermediate-sized saved tensor per MLP fewer."""

from __future__ import annotations

import copy

import torch

from petuner.adapters import build_adapter, inject
from petuner.run import set_up
from petuner.train.lean_swiglu import SwiGLU, lean_swiglu
from tests.helpers import lora_cfg, tiny_llama

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def lora_llama() -> torch.nn.Module:
    model = tiny_llama().train()
    inject(model, build_adapter(lora_cfg(target_modules=ALL_PROJECTIONS)), [])
    return model


def test_swiglu_gradients_are_exact() -> None:
    gate, up = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate.detach(), up))  # only up trains: gate alone is saved
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up.detach()))


def test_loss_and_every_gradient_equal_the_plain_mlp() -> None:
    """LoRA on every projection, the MLP's included: the adapters on gate/up/down train through it."""
    plain = lora_llama()
    lean = copy.deepcopy(plain)
    assert lean_swiglu(lean) == 2
    losses, grads = [], []
    for model in (plain, lean):
        loss = model(**batch()).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any("gate_proj" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def saved_in_mlps(model: torch.nn.Module) -> int:
    """Activations autograd saves for backward from inside the MLPs (weights aside), with only the
    embeddings training (the MLP's frozen weights need no inputs saved)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.embed_tokens"))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = [], []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *a: inside.append(True))
        layer.mlp.register_forward_hook(lambda *a: inside.pop())

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside and t.untyped_storage().data_ptr() not in weights:
            saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch()).loss.backward()
    return len(saved)


def test_each_mlp_saves_two_intermediates_instead_of_three() -> None:
    plain = tiny_llama().train()
    lean = copy.deepcopy(plain)
    lean_swiglu(lean)
    assert saved_in_mlps(plain) == 3 * 2  # gate(x), silu(gate(x)), up(x) in each of 2 layers
    assert saved_in_mlps(lean) == 2 * 2


def test_a_deep_copy_computes_with_its_own_weights() -> None:
    model = tiny_llama()
    lean_swiglu(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight.zero_()
        assert not torch.equal(twin(**batch()).logits, model(**batch()).logits)


def test_a_run_installs_it_unless_switched_off(cfg_factory) -> None:
    on = set_up(cfg_factory()).model
    off = set_up(cfg_factory("trainer.lean_swiglu=false")).model
    assert all("forward" in layer.mlp.__dict__ for layer in on.model.layers)
    assert not any("forward" in layer.mlp.__dict__ for layer in off.model.layers)
