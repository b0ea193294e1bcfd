"""GaLore: parity with galore-torch, projectors, 8-bit moments, per-layer updates, weight decay, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from petuner.errors import ConfigError
from petuner.optim import build_optimizer, check_optimizer_cfg
from petuner.optim import projectors as proj
from petuner.optim.galore import GaLoreAdamW
from petuner.optim.groups import galore_matrices
from petuner.run import run
from tests.helpers import batches, tiny_llama, train


def galore_cfg(**kw):
    base = {"name": "galore", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-6,
            "schedule": "constant", "warmup_steps": 0, "rank": 8, "update_proj_gap": 10, "scale": 0.5,
            "projector": "svd", "per_layer": False}
    cfg = OmegaConf.create({**base, **kw})
    check_optimizer_cfg(cfg)
    return cfg


def test_svd_projector_reproduces_galore_torch_over_a_refresh() -> None:
    from galore_torch import GaLoreAdamW as Reference

    ours, ref = tiny_llama(), tiny_llama()
    cfg = galore_cfg()
    optimizer = build_optimizer(ours, cfg, torch.device("cpu"))
    projected = set(galore_matrices(ours, list(ours.named_parameters()), cfg.rank))
    assert len(projected) == 14  # 7 linear layers × 2 blocks; embeddings and norms stay plain
    named = dict(ref.named_parameters())
    reference = Reference([{"params": [named[n] for n in sorted(projected)], "rank": 8, "update_proj_gap": 10,
                            "scale": 0.5, "proj_type": "std"},
                           {"params": [p for n, p in named.items() if n not in projected]}],
                          lr=1e-3, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)
    data = batches(3) * 10  # a few batches to memorize; projector refreshes at steps 0, 10, 20
    ours_losses, ref_losses = train(ours, optimizer, data), train(ref, reference, data)
    assert max(abs(a - b) for a, b in zip(ours_losses, ref_losses, strict=True)) < 1e-5
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-5, name
    assert ours_losses[-1] < ours_losses[0] - 0.5
    moved = {n for n, p in ours.named_parameters() if n in projected
             and not torch.equal(p, dict(tiny_llama().named_parameters())[n])}
    assert moved == projected


def clear_spectrum(m: int, n: int, rank: int, right: torch.Tensor | None = None) -> torch.Tensor:
    """U diag(s) Vᵀ with a large gap after ``rank`` singular values (V optionally given)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v = right if right is not None else torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    s = torch.cat([torch.linspace(10, 5, rank), torch.full((min(m, n) - rank,), 1e-3)])
    return u @ torch.diag(s) @ v[:, :min(m, n)].t()


def subspace(p: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The orthogonal projector onto P's span, on the projected side."""
    basis = p.t() if proj.side(shape) == "right" else p
    return basis @ basis.t()


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_randomized_and_dct_projectors_find_the_exact_subspace(shape) -> None:
    m, n, rank = *shape, 6
    grad = clear_spectrum(m, n, rank)
    exact = subspace(proj.svd_projector(grad, rank), shape)
    randomized = subspace(proj.randomized_projector(grad, rank, seed=3), shape)
    assert (exact - randomized).norm() < 1e-4
    # DCT can only find a DCT-aligned subspace: the gradient's singular vectors on the projected side
    # are DCT columns (random ones, in shuffled order); the other side is random.
    k = min(m, n)
    basis = proj.dct_basis(k, torch.device("cpu"), torch.float32)
    chosen = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    if proj.side(shape) == "right":
        grad = clear_spectrum(m, n, rank, right=basis[:, chosen])
    else:  # the DCT vectors as left singular vectors
        grad = clear_spectrum(n, m, rank, right=basis[:, chosen]).t()
    indices = proj.dct_indices(grad, basis, rank)
    assert sorted(indices.tolist()) == sorted(chosen[:rank].tolist())
    dct = subspace(proj.dct_projector(basis, indices, grad.shape), shape)
    assert (subspace(proj.svd_projector(grad, rank), shape) - dct).norm() < 1e-3
    # the projected-back gradient keeps what the exact projector keeps
    p = proj.dct_projector(basis, indices, grad.shape)
    kept = proj.project_back(proj.project(grad, p), p, grad.shape)
    assert (kept - grad).norm() / grad.norm() < 1e-3


def test_dct_basis_is_orthonormal() -> None:
    basis = proj.dct_basis(40, torch.device("cpu"), torch.float64)
    assert torch.allclose(basis.t() @ basis, torch.eye(40, dtype=torch.float64), atol=1e-12)


def test_8bit_moments_are_uint8_and_track_the_32bit_run() -> None:
    data = batches(2) * 10
    runs = {}
    for quantize in (False, True):
        model = tiny_llama()
        optimizer = build_optimizer(model, galore_cfg(name="galore8bit" if quantize else "galore",
                                                      **({"min_8bit_size": 256} if quantize else {})),
                                    torch.device("cpu"))
        runs[quantize] = (train(model, optimizer, data), optimizer, model)
    losses32, _, _ = runs[False]
    losses8, optimizer, model = runs[True]
    states = [optimizer.state[p] for p in model.parameters()]
    big = [s for s, p in zip(states, model.parameters(), strict=True) if s["exp_avg"].numel() >= 256]
    assert big and all(s["exp_avg"].dtype == torch.uint8 and s["exp_avg_sq"].dtype == torch.uint8 for s in big)
    assert all(s["exp_avg_absmax"].dtype == torch.float32 for s in big)
    small = [s for s in states if s["exp_avg"].numel() < 256]
    assert small and all(s["exp_avg"].dtype == torch.float32 for s in small)
    # Measured gap 4e-4 over 20 steps. Planted bugs, each seen to fail here: scale 0.4 instead of 0.5 in the
    # 8-bit run (gap 0.015), betas=(0.9, 0.9) (0.022). The old bound, 2% of the first loss (0.097), passed both.
    assert max(abs(a - b) for a, b in zip(losses8, losses32, strict=True)) < 1e-3
    assert losses8[-1] < losses8[0] - 0.5


def test_per_layer_updates_equal_a_global_step() -> None:
    data = batches(12)
    results = []
    for per_layer in (False, True):
        model = tiny_llama()
        optimizer = build_optimizer(model, galore_cfg(per_layer=per_layer, update_proj_gap=5), torch.device("cpu"))
        losses = []
        for ids in data:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if per_layer:  # every update already happened in backward, every gradient is freed
                assert all(p.grad is None for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results.append((losses, model))
    (a_losses, a), (b_losses, b) = results
    assert a_losses == b_losses
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_weight_decay_is_decoupled_and_applied_to_w_before_the_update() -> None:
    ids = batches(1)[0]
    after = {}
    for wd in (0.0, 0.1):
        model = tiny_llama()
        optimizer = build_optimizer(model, galore_cfg(weight_decay=wd), torch.device("cpu"))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after[wd] = dict(model.named_parameters())
    before = dict(tiny_llama().named_parameters())
    name = "model.layers.0.mlp.up_proj.weight"  # a projected matrix
    assert torch.allclose(after[0.1][name] - after[0.0][name], -1e-3 * 0.1 * before[name], rtol=0, atol=1e-8)
    norm = "model.norm.weight"  # 1-D: never decayed
    assert torch.equal(after[0.1][norm], after[0.0][norm])


def test_state_dict_holds_projectors_and_steps_as_plain_tensors(tmp_path) -> None:
    data = batches(4)
    model = tiny_llama()
    optimizer = build_optimizer(model, galore_cfg(name="galore8bit", min_8bit_size=256, projector="dct",
                                                  update_proj_gap=3), torch.device("cpu"))
    train(model, optimizer, data[:2])
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    clone = copy.deepcopy(model)
    restored = build_optimizer(clone, galore_cfg(name="galore8bit", min_8bit_size=256, projector="dct",
                                                 update_proj_gap=3), torch.device("cpu"))
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    name = "model.layers.0.mlp.up_proj.weight"
    state = restored.state[dict(clone.named_parameters())[name]]
    assert state["projector_index"].dtype == torch.int64 and state["exp_avg"].dtype == torch.uint8
    assert state["step"] == 2
    assert train(model, optimizer, data[2:]) == train(clone, restored, data[2:])
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("overrides", [
    ("optimizer=galore", "optimizer.projector=svd"),
    ("optimizer=galore8bit", "optimizer.projector=randomized", "optimizer.min_8bit_size=256"),
    ("optimizer=adamw8bit", "optimizer.min_8bit_size=256"),
])
def test_resume_reproduces_an_uninterrupted_run(resume_check, overrides) -> None:
    galore = ("optimizer.rank=8", "optimizer.update_proj_gap=2") if "galore" in overrides[0] else ()
    # checkpoint at 3, projector refresh at 4
    straight, resumed = resume_check("adapter=none", "trainer.max_steps=6", *overrides, *galore)
    memory = lambda d: json.loads((d / "run.json").read_text())["results"]["memory/optimizer_state_bytes"]  # noqa: E731
    assert memory(straight) == memory(resumed) > 0



def test_galore_refuses_what_cannot_work(cfg_factory) -> None:
    with pytest.raises(ConfigError, match=r"optimizer.rank=64 leaves GaLore nothing to project.*largest here: 64"):
        run(cfg_factory("adapter=none", "optimizer=galore", "optimizer.rank=64"))
    with pytest.raises(ConfigError, match=r"per_layer=true .* trainer.max_grad_norm=1.0 cannot clip"):
        run(cfg_factory("adapter=none", "optimizer=galore", "optimizer.per_layer=true"))
    with pytest.raises(ConfigError, match=r"trainer.grad_accum=2 cannot accumulate"):
        run(cfg_factory("adapter=none", "optimizer=galore", "optimizer.per_layer=true", "trainer.max_grad_norm=null",
                        "trainer.grad_accum=2"))


def test_per_layer_run_trains_end_to_end(cfg_factory) -> None:
    info = run(cfg_factory("adapter=none", "optimizer=galore", "optimizer.rank=8", "optimizer.per_layer=true",
                           "trainer.max_grad_norm=null", "trainer.max_steps=10", "trainer.save_every=null"))
    assert info["results"]["eval/loss_after"] < info["results"]["eval/loss_before"] - 0.1
    # gradients were freed in backward: none is held when the optimizer steps
    assert info["results"]["memory/grad_bytes"] == 0


def test_galore_trains_every_projected_matrix_with_a_small_state() -> None:
    model = tiny_llama()
    cfg = galore_cfg(rank=4)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, GaLoreAdamW)
    train(model, optimizer, batches(2))
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        if name in galore_matrices(model, list(model.named_parameters()), 4):
            m, n = p.shape
            assert state["exp_avg"].shape == ((m, 4) if m >= n else (4, n)), name
        else:
            assert state["exp_avg"].shape == p.shape, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("projector", ["svd", "randomized", "dct"])
def test_low_precision_weights_train_and_resume_with_fp32_state(dtype, projector, tmp_path) -> None:
    """bf16/fp16 weights (GaLore's main use): fp32 projectors, basis and moments; the saved state comes
    back exactly (torch's load_state_dict would cast it to the weight's dtype: DCT indices above 256 and
    fp32 moments would lose values) and the resumed step equals the uninterrupted one."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(600, 320, generator=g).to(dtype))
    grads = [torch.randn(600, 320, generator=g).to(dtype) for _ in range(3)]

    def optimizer_for(p):
        return GaLoreAdamW([{"params": [p], "rank": 16, "update_proj_gap": 5, "scale": 0.5, "projector": projector}],
                           lr=1e-2)

    def step(opt, p, grad):
        p.grad = grad.clone()
        opt.step()

    initial = weight.detach().clone()
    opt = optimizer_for(weight)
    for grad in grads[:2]:
        step(opt, weight, grad)
    state = opt.state[weight]
    assert state["exp_avg"].dtype == torch.float32
    assert (state["projector"] if projector != "dct" else opt._basis(weight)).dtype == torch.float32
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    clone = torch.nn.Parameter(weight.detach().clone())
    restored = optimizer_for(clone)
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for key, value in state.items():
        if torch.is_tensor(value):
            assert restored.state[clone][key].dtype == value.dtype and torch.equal(restored.state[clone][key], value)
    if projector == "dct":
        assert int(state["projector_index"].max()) > 256  # where a bf16 cast would have rounded
    step(opt, weight, grads[2])
    step(restored, clone, grads[2])
    assert torch.equal(weight, clone)
    assert not torch.equal(weight, initial) and torch.isfinite(weight).all()
