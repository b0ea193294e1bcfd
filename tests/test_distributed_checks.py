"""What a launch cannot do is one line, before anything loads; the collective helpers are no-ops alone."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from petuner.errors import ConfigError
from petuner.run import run
from petuner.train import distributed


def test_fsdp_without_a_process_group_is_one_line(cfg_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.strategy=fsdp .* no process group: launch it with torchrun"):
        run(cfg_factory("trainer.strategy=fsdp"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_unknown_strategy_is_one_line(cfg_factory) -> None:
    with pytest.raises(ConfigError, match=r"trainer.strategy='zero3': allowed: ddp, fsdp"):
        run(cfg_factory("trainer.strategy=zero3"))


def test_per_layer_galore_is_refused_under_a_process_group(cfg_factory, tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match=r"optimizer.per_layer=true .* with torchrun use optimizer.per_layer"):
            run(cfg_factory("adapter=none", "optimizer=galore", "optimizer.per_layer=true",
                            "trainer.max_grad_norm=null"))
    finally:
        dist.destroy_process_group()


def test_alone_every_collective_is_the_identity() -> None:
    x = torch.tensor([1.0, 2.0])
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_writer()
    assert distributed.sum_over_ranks(x) is x
    assert distributed.any_rank(torch.tensor([False, True])).tolist() == [False, True]
    assert distributed.broadcast_object("a") == "a" and distributed.gather_objects(3) == [3]
    assert distributed.shard([4, 5, 6]) == [4, 5, 6]
    assert distributed.whole_batches([[1, 2], [3]]) == [[1, 2], [3]]
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model


@pytest.mark.parametrize(("overrides", "message"), [
    (("adapter=qlora",), r"trainer.strategy=fsdp cannot shard adapter=qlora: allowed with fsdp: lora, none"),
    (("adapter=none", "optimizer=galore"), r"trainer.strategy=fsdp with optimizer=galore: allowed with fsdp"),
])
def test_what_fsdp_cannot_shard_is_one_line(cfg_factory, overrides, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run(cfg_factory("trainer.strategy=fsdp", *overrides))
