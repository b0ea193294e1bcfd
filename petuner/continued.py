"""``init_from=RUN``: a run that continues from a finished run's adapter (an SFT run, before DPO).

The new run trains the same adapter on the same base model: its ``adapter`` section is the one the
earlier run trained with (replacing whatever the command line composed, so the weights fit), the
policy starts from that run's weights, and a preference objective's reference is those weights,
frozen (``petuner.objectives.reference.StartingAdapter``), not the bare base model. A path that holds
no run, or a run of another base model, is refused before anything loads.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from petuner.errors import ConfigError, PetunerError
from petuner.io import ADAPTER_FILE


def continue_from(cfg: DictConfig) -> None:
    """Check ``init_from`` and take its run's adapter section into ``cfg`` (nothing to do without it)."""
    from petuner.run_folder import read_config

    source = cfg.get("init_from")
    if not source:
        return
    folder = Path(str(source))
    try:
        saved = read_config(folder)
    except PetunerError as err:
        raise ConfigError(f"init_from={source}: {err}") from None
    if not (folder / ADAPTER_FILE).is_file():
        raise ConfigError(f"init_from={source}: the run has no {ADAPTER_FILE} (it never finished)")
    mine, theirs = (OmegaConf.to_container(c.model, resolve=True) for c in (cfg, saved))
    if mine != theirs:
        differ = next(k for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k))  # type: ignore[union-attr]
        raise ConfigError(f"init_from={source} trained another base model: its model.{differ}="
                          f"{theirs.get(differ)!r}, this run's is {mine.get(differ)!r}")  # type: ignore[union-attr]
    with open_dict(cfg):
        cfg.adapter = saved.adapter


def load_starting_weights(model: nn.Module, source: str) -> None:
    """The earlier run's adapter weights into the freshly injected model."""
    from safetensors.torch import load_file

    from petuner.adapters import load_adapter_state_dict

    load_adapter_state_dict(model, load_file(str(Path(source) / ADAPTER_FILE)))
