"""The run folder ``petuner merge`` writes: the first input's config and run.json with ``adapter=merged`` (one
rank per module, scale 1) and the merged factors as its weights, so ``petuner.load`` and every command that
reads a run folder take it unchanged."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from petuner.io import ADAPTER_FILE, CONFIG_FILE, RUN_FILE, atomic_dir, save_tensors


def write_merged_run(first: Path | str, out: Path, merged: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     meta: dict[str, Any], *, force: bool) -> None:
    """Write the merged run folder ``out`` from the (A, B) of each module, in the model's module order."""
    import json

    from petuner.run_folder import read_config, read_info

    cfg, info = read_config(first), read_info(first)
    ranks = {name: a.shape[0] for name, (a, _) in merged.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    cfg.adapter = OmegaConf.create({"name": "merged", "r": r, "target_modules": list(merged),
                                    "ranks": {n: k for n, k in ranks.items() if k != r}})
    cfg.run_dir, cfg.export = str(out.resolve()), None
    state = {}
    for name, (a, b) in merged.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    info = {**info, "run_dir": str(out.resolve()), "targets": list(merged), "head_modules": [], "results": {},
            "trainable_parameters": sum(t.numel() for t in state.values()), "merge": meta}
    with atomic_dir(out, replace=force) as tmp:
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        save_tensors(state, tmp / ADAPTER_FILE)
