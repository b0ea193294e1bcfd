"""The ``petuner`` command: trained runs (``export``, ``eval-ranks``, ``sweep-report``) and the data (``data``).

Training itself is ``python train.py`` (Hydra). Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from petuner.errors import PetunerError
from petuner.sweep import DIRECTIONS


def _export(args: argparse.Namespace) -> None:
    from petuner.export import export

    out = export(args.run_dir, args.format, args.out or f"{args.run_dir.rstrip('/')}/export-{args.format}",
                 force=args.force, rank=args.rank)
    print(out)


def _eval_ranks(args: argparse.Namespace) -> None:
    from petuner.rank_eval import eval_ranks

    for row in eval_ranks(args.run_dir, args.out):
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def _sweep_report(args: argparse.Namespace) -> None:
    from petuner.sweep import sweep_report

    print(sweep_report(args.sweep_dir, args.objective, args.out).read_text())


def _data(args: argparse.Namespace) -> None:
    """Build the data exactly as ``python train.py <overrides>`` would (tokenizer only, no weights) and show it."""
    from petuner.config import check_command_line, compose_config
    from petuner.data import build_data, check_data_cfg
    from petuner.data.report import describe
    from petuner.models import check_model_cfg, context_length, load_tokenizer, model_config

    check_command_line(args.overrides)
    cfg = compose_config([*args.overrides, "run_dir=."])
    check_model_cfg(cfg.model)
    check_data_cfg(cfg.data, cfg.model.task, context_length(model_config(cfg.model)))
    tokenizer = load_tokenizer(cfg.model)
    print(describe(build_data(cfg.data, tokenizer, cfg.model.task), tokenizer, args.examples))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petuner", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write a run's adapter as a peft folder or a merged HF model")
    exp.add_argument("run_dir", help="a run folder (adapters/<run>)")
    exp.add_argument("--format", choices=("peft", "merged"), default="peft")
    exp.add_argument("--out", help="destination folder (default: RUN_DIR/export-FORMAT)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty destination")
    exp.add_argument("--rank", type=int, help="export a rank-dynamic adapter (dylora) truncated to this rank")
    exp.set_defaults(func=_export)
    ranks = commands.add_parser("eval-ranks", help="evaluate a DyLoRA run at every rank 1..r (JSON, markdown, PNG)")
    ranks.add_argument("run_dir")
    ranks.add_argument("--out", help="folder for rank_eval.{json,md,png} (default: RUN_DIR)")
    ranks.set_defaults(func=_eval_ranks)
    report = commands.add_parser("sweep-report", help="tabulate a -m sweep's jobs (markdown, CSV, PNG plots)")
    report.add_argument("sweep_dir", help="the sweep folder (adapters/sweeps/<time>)")
    report.add_argument("--objective", choices=tuple(DIRECTIONS),
                        help="the metric that picks the best job (default: accuracy if present, else loss)")
    report.add_argument("--out", help="folder for sweep_report.{md,csv} and plots (default: SWEEP_DIR)")
    report.set_defaults(func=_sweep_report)
    data = commands.add_parser("data", help="show the data a run would train on: counts, lengths, truncation, "
                                            "examples with their labelled tokens marked (same overrides as train.py)")
    data.add_argument("overrides", nargs="*", help="config overrides as for train.py, e.g. data=chat data.path=x.jsonl")
    data.add_argument("--examples", type=int, default=2, help="how many training examples to decode (default 2)")
    data.set_defaults(func=_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PetunerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
