"""aTLAS over two earlier runs: starts as their plain average, trains one coefficient per matrix per source (and
nothing else), reloads and exports as LoRA exactly; a source on another base is one line before anything is
written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from petuner.adapters import adapter_layers, trainable_parameters
from petuner.errors import PetunerError
from petuner.export import export
from petuner.models import load_model
from petuner.run_folder import load, read_config
from tests.conftest import make_cfg
from tests.helpers import perturbed_run

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sources(trained_run, tmp_path_factory):
    """trained_run (LoRA r=8) and a DoRA run (r=4, seeded random weights; its update is no LoRA: composed through
    its exact SVD)."""
    return [trained_run, perturbed_run(trained_run, tmp_path_factory.mktemp("atlas_src") / "dora", seed=3,
                                       variant="dora", r=4)]


def updates(run_dir) -> dict[str, torch.Tensor]:
    model = load(run_dir, tokenizer=False).model
    with torch.no_grad():
        return {name: layer.weight_update().float() for name, layer in adapter_layers(model)}


def test_atlas_starts_at_the_average_and_trains_only_its_coefficients(sources, tmp_path) -> None:
    from petuner.adapters import build_adapter, inject
    from petuner.merge import read_sources
    from petuner.run import run

    cfg = make_cfg(tmp_path / "built", "adapter=atlas", f"adapter.sources=[{sources[0]},{sources[1]}]")
    method = build_adapter(cfg.adapter)  # the composed model as training builds it
    method.compose(read_sources(cfg, method.sources()))
    built = load_model(cfg.model)
    inject(built, method, [])
    a, b = updates(sources[0]), updates(sources[1])
    with torch.no_grad():
        for name, layer in adapter_layers(built):
            assert (layer.weight_update() - 0.5 * (a[name] + b[name])).abs().max() <= 1e-5, name
    trained = tmp_path / "atlas"
    run(make_cfg(trained, "adapter=atlas", f"adapter.sources=[{sources[0]},{sources[1]}]", "trainer.max_steps=4"))
    info = json.loads((trained / "run.json").read_text())
    assert info["trainable_parameters"] == 4 * 2  # 4 adapted matrices x 2 sources
    model = load(trained, tokenizer=False).model
    assert set(trainable_parameters(model)) == {f"{n}.coefficients" for n, _ in adapter_layers(model)}
    coefficients = torch.stack([layer.coefficients for _, layer in adapter_layers(model)])
    assert (coefficients - 0.5).abs().max() > 1e-3  # they trained
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    out = export(trained, "peft", tmp_path / "peft")  # the learned sum as a plain LoRA, exactly
    reloaded = PeftModel.from_pretrained(load_model(read_config(trained).model), str(out)).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=IDS).logits - ours).abs().max() <= 1e-5


def test_atlas_with_a_source_of_another_base_is_one_line_and_writes_nothing(sources, tmp_path) -> None:
    from petuner.run import run

    other = tmp_path / "other"
    shutil.copytree(sources[0], other)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**info, "base_model": "someone/else"}))
    with pytest.raises(PetunerError, match=r"^adapter.sources: .*other was trained on another base \(someone/else"):
        run(make_cfg(tmp_path / "atlas", "adapter=atlas", f"adapter.sources=[{sources[0]},{other}]"))
    assert not (tmp_path / "atlas").exists()
