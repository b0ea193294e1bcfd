"""Trainable parameters of every adapter's ready config on SmolLM2-135M (q_proj, v_proj; 30 layers).

Each adapter is injected into a copy of the real model with its conf/adapter YAML as shipped (plus
the overrides listed) and its trainable parameters counted; the ratio is against LoRA at the same
r. Writes benchmarks/results/adapter_params.{json,md}.

    .venv/bin/python benchmarks/adapter_params.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from petuner.adapters import build_adapter, inject, trainable_parameters
from petuner.config import compose_config
from petuner.models import load_model
from petuner.report import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = [  # (label, overrides)
    ("lora r=8", ["adapter=lora"]),
    ("lora r=8, variant=dora", ["adapter=lora", "adapter.variant=dora"]),
    ("lora r=8, init=pissa", ["adapter=lora", "adapter.init=pissa"]),
    ("block_lora r=8, n_blocks=2", ["adapter=block_lora", "adapter.n_blocks=2"]),
    ("block_lora r=8, n_blocks=8", ["adapter=block_lora"]),
    ("block_lora r=8, n_blocks=64", ["adapter=block_lora", "adapter.n_blocks=64"]),
    ("loldu r=8", ["adapter=loldu"]),
    ("loldu r=8, train_scale", ["adapter=loldu", "adapter.train_scale=true"]),
    ("svfit r=8", ["adapter=svfit"]),
    ("dylora r=8", ["adapter=dylora"]),
    ("sora r=8", ["adapter=sora"]),
    ("qlora r=8", ["adapter=qlora"]),
    ("lq_lora r=8", ["adapter=lq_lora"]),
    ("peft LoHa r=8", ["adapter=loha"]),
    ("peft AdaLoRA init_r=12 (before pruning)", ["adapter=adalora"]),
    ("peft VeRA r=256", ["adapter=vera"]),
]


def main() -> None:
    base_cfg = compose_config(["run_dir=unused"])
    model = load_model(base_cfg.model)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for label, overrides in ROWS:
        cfg = compose_config(["run_dir=unused", *overrides])
        adapted = copy.deepcopy(model)
        inject(adapted, build_adapter(cfg.adapter))
        count = sum(p.numel() for p in trainable_parameters(adapted).values())
        rows.append({"adapter": label, "overrides": overrides, "trainable": count})
        print(label, count, flush=True)
    lora = rows[0]["trainable"]
    for row in rows:
        row["vs_lora_r8"] = row["trainable"] / lora
        row["percent_of_model"] = 100 * row["trainable"] / total
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adapter_params.json").write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "total": total,
                                                             "rows": rows}, indent=2) + "\n")
    table = markdown_table(["adapter (q_proj, v_proj of SmolLM2-135M)", "trainable", "vs LoRA r=8", "% of model"],
                           [[r["adapter"], f"{r['trainable']:,}", f"{r['vs_lora_r8']:.4f}",
                             f"{r['percent_of_model']:.4f}"] for r in rows])
    (RESULTS / "adapter_params.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
