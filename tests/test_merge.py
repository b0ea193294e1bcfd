"""petuner merge: parity with peft's add_weighted_adapter for plain LoRA, the dense computation for rsLoRA and
DoRA (where peft's is wrong), a self-merge reproducing the run, and the merged run folder loading and exporting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

from petuner.adapters import adapter_layers
from petuner.cli import main
from petuner.export import export
from petuner.merge import merge_runs
from petuner.models import load_model
from petuner.run_folder import load, read_config
from tests.helpers import perturbed_run

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run):
    """trained_run (LoRA r=8) plus, on its base, a second LoRA (r=8), an rsLoRA and a DoRA run (r=4), each with
    seeded random adapter weights (helpers.perturbed_run: the merge math needs distinct updates, not training)."""
    root = tmp_path_factory.mktemp("merge_runs")
    return {"lora_a": trained_run, "lora_b": perturbed_run(trained_run, root / "lora_b", seed=1),
            "rs": perturbed_run(trained_run, root / "rs", seed=2, scaling="rslora", r=4),
            "dora": perturbed_run(trained_run, root / "dora", seed=3, variant="dora", r=4)}


_UPDATES: dict[str, dict[str, torch.Tensor]] = {}


def updates(run_dir) -> dict[str, torch.Tensor]:
    """Each adapted module's ΔW (relative to the original base) as petuner.load gives it (cached per folder)."""
    if str(run_dir) not in _UPDATES:
        model = load(run_dir, tokenizer=False).model
        with torch.no_grad():
            _UPDATES[str(run_dir)] = {name: layer.weight_update().float() for name, layer in adapter_layers(model)}
    return _UPDATES[str(run_dir)]


def peft_pair(runs_in, tmp_path) -> PeftModel:
    """A PeftModel holding the runs' peft exports as adapters r0, r1, ..."""
    base = load_model(read_config(runs_in[0]).model)
    model = PeftModel.from_pretrained(base, str(export(runs_in[0], "peft", tmp_path / "p0")), adapter_name="r0")
    for i, run_dir in enumerate(runs_in[1:], start=1):
        model.load_adapter(str(export(run_dir, "peft", tmp_path / f"p{i}")), adapter_name=f"r{i}")
    return model


@pytest.fixture(scope="module")
def plain_pair(runs, tmp_path_factory):
    return peft_pair([runs["lora_a"], runs["lora_b"]], tmp_path_factory.mktemp("peft_pair"))


def peft_merged(model, weights, method, density=None) -> dict[str, torch.Tensor]:
    """peft's add_weighted_adapter over ``model``'s adapters: the merged adapter's ΔW per module."""
    names = [n for n in model.peft_config if n.startswith("r")]
    model.add_weighted_adapter(names, list(weights), "m", combination_type=method, density=density)
    try:
        with torch.no_grad():
            return {n.removeprefix("base_model.model."): m.get_delta_weight("m").float()
                    for n, m in model.named_modules() if hasattr(m, "lora_A") and "m" in m.lora_A}
    finally:
        model.delete_adapter("m")


def content_mask(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """A DARE drop that depends only on the tensor's values: peft's and petuner's draw the same mask with it."""
    keep = (tensor.double() * 1e6).frac().abs() < density
    return tensor * keep / (density if rescale else 1.0)


def assert_updates_equal(ours: dict, theirs: dict, tol: float) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= tol, name


@pytest.mark.parametrize(("method", "density"), [("linear", None), ("cat", None), ("svd", None), ("ties", 0.5),
                                                 ("dare_linear", 0.5), ("dare_ties", 0.7)])
def test_plain_lora_equals_peft_add_weighted_adapter(runs, plain_pair, tmp_path, monkeypatch, method, density):
    """DARE's random drop is replaced in both by one that depends on the values only (the generator's draws
    differ: peft's first initialises the new adapter from it); its determinism is tested below."""
    monkeypatch.setattr(merge_utils, "random_pruning", content_mask)
    pair, weights = [runs["lora_a"], runs["lora_b"]], [0.7, -0.4]
    out = merge_runs(pair, tmp_path / "m", method=method, weights=weights, density=density, seed=3)
    theirs = peft_merged(plain_pair, weights, method, density)
    assert max(t.abs().max() for t in theirs.values()) > 1e-3  # the merge is not trivially zero
    assert_updates_equal(updates(out), theirs, 1e-5)


def test_dare_is_deterministic_under_its_seed(runs, tmp_path) -> None:
    pair = [runs["lora_a"], runs["lora_b"]]
    same = [merge_runs(pair, tmp_path / f"m{i}", method="dare_ties", weights=[1, 1], density=0.5, seed=s)
            for i, s in enumerate((5, 5, 6))]
    a, b, c = (updates(m) for m in same)
    assert_updates_equal(a, b, 0.0)
    assert any((a[n] - c[n]).abs().max() > 1e-4 for n in a)  # another seed drops other entries


def test_rslora_merge_is_the_dense_computation_where_peft_scales_it_by_sqrt_r(runs, tmp_path) -> None:
    pair, weights = [runs["rs"], runs["lora_b"]], [0.6, 0.9]
    dense = [updates(r) for r in pair]
    ours = updates(merge_runs(pair, tmp_path / "m", method="task_arithmetic", weights=weights))
    expected = {n: weights[0] * dense[0][n] + weights[1] * dense[1][n] for n in dense[0]}
    assert_updates_equal(ours, expected, 1e-5)
    theirs = peft_merged(peft_pair(pair, tmp_path), weights, "cat")  # rank 4+8=12, use_rslora kept from the first
    for name in expected:  # lora_alpha = r = 12 read as alpha/sqrt(r): every merged update √12 times too large
        assert (theirs[name] - 12 ** 0.5 * expected[name]).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_dora_merge_is_the_dense_computation_on_the_weight_deltas(runs, tmp_path, method) -> None:
    pair, weights = [runs["dora"], runs["lora_b"]], [0.5, 0.8]
    dense = [updates(r) for r in pair]
    density = 0.6 if method == "ties" else None
    ours = updates(merge_runs(pair, tmp_path / "m", method=method, weights=weights, density=density))
    combine = merge_utils.task_arithmetic if method == "task_arithmetic" else (
        lambda t, w: merge_utils.ties(t, w, density, "total"))
    expected = {n: combine([dense[0][n], dense[1][n]], torch.tensor(weights)) for n in dense[0]}
    assert_updates_equal(ours, expected, 1e-5)


def test_self_merge_reproduces_the_run_and_the_merged_run_exports(runs, tmp_path) -> None:
    out = merge_runs([runs["lora_a"]], tmp_path / "self", method="linear", weights=[1.0])
    original, merged = (load(r, tokenizer=False).model for r in (runs["lora_a"], out))
    with torch.no_grad():
        expected = original(input_ids=IDS).logits
        assert (merged(input_ids=IDS).logits - expected).abs().max() <= 1e-5
        peft_dir = export(out, "peft", tmp_path / "peft")
        reloaded = PeftModel.from_pretrained(load_model(read_config(out).model), str(peft_dir)).eval()
        assert (reloaded(input_ids=IDS).logits - expected).abs().max() <= 1e-5
    twice = merge_runs([runs["lora_a"], runs["lora_a"]], tmp_path / "twice", method="task_arithmetic",
                       weights=[0.5, 0.5])
    with torch.no_grad():
        assert (load(twice, tokenizer=False).model(input_ids=IDS).logits - expected).abs().max() <= 1e-5
    assert json.loads((out / "run.json").read_text())["merge"]["method"] == "linear"


@pytest.fixture
def other_base(runs, tmp_path):
    """A copy of lora_b's folder claiming another base model."""
    other = tmp_path / "other"
    shutil.copytree(runs["lora_b"], other)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**info, "base_model": "someone/else"}))
    return other


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "mean"], "--method 'mean': allowed: linear"),
    (["--method", "ties", "--density", "0"], "--density 0.0: --method ties needs a density in (0, 1]"),
    (["--method", "dare_linear", "--density", "1.5"], "needs a density in (0, 1]"),
    (["--weights", "1", "2", "3"], "--weights: 3 given for 2 runs"),
    (["OTHER"], "was trained on another base"),
])
def test_bad_merge_input_is_one_line_exit_2_and_writes_nothing(runs, other_base, tmp_path, capsys, args, message):
    second = str(other_base) if "OTHER" in args else str(runs["lora_b"])
    argv = ["merge", str(runs["lora_a"]), second, *(a for a in args if a != "OTHER"), "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "m").exists()
