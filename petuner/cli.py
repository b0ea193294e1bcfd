"""The ``petuner`` command: work on trained runs (``export``, ``eval-ranks``, ``sweep-report``).

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petuner", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write a run's adapter as a peft folder or a merged HF model")
    exp.add_argument("run_dir", help="a run folder (adapters/<run>)")
    exp.add_argument("--format", choices=("peft", "merged", "quantized"), default="peft")
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
