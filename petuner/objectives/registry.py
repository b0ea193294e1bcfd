"""The one registry of training objectives: ``loss.name`` in the config picks an entry here.

Every module in ``petuner/objectives/`` is imported on first lookup, so a new objective is one new file
that decorates its class with ``@register_objective`` (plus its YAML in conf/loss/).
"""

from __future__ import annotations

from typing import Any

from petuner.registry import Registry

OBJECTIVES = Registry("petuner.objectives", "loss", "objective", infrastructure={"registry", "pairs", "reference",
                                                                                   "schema"})
register_objective = OBJECTIVES.register
objective_names = OBJECTIVES.names
get_objective_class = OBJECTIVES.get


def build_objective(cfg: Any) -> Any:
    """Instantiate (and validate) the objective named by ``cfg.name``."""
    return OBJECTIVES.build(cfg)
