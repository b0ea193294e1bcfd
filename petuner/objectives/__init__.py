"""Training objectives: what the loop optimises, one module each (sft, dpo, simpo, orpo), one registry.

An objective turns (model, batch) into a loss and its metrics (``petuner.train.objective.Objective``);
``loss=<name>`` picks it and ``conf/loss/<name>.yaml`` holds its options, typed by its ``schema``.
"""

from petuner.objectives.registry import build_objective, get_objective_class, objective_names, register_objective

__all__ = ["build_objective", "get_objective_class", "objective_names", "register_objective"]
