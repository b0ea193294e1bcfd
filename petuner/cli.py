"""The ``petuner`` command: work on trained runs (``export``; later ``eval-ranks``, ``sweep-report``).

Training itself is ``python train.py`` (Hydra). Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from petuner.errors import PetunerError


def _export(args: argparse.Namespace) -> None:
    from petuner.export import export

    out = export(args.run_dir, args.format, args.out or f"{args.run_dir.rstrip('/')}/export-{args.format}",
                 force=args.force)
    print(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petuner", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write a run's adapter as a peft folder or a merged HF model")
    exp.add_argument("run_dir", help="a run folder (adapters/<run>)")
    exp.add_argument("--format", choices=("peft", "merged"), default="peft")
    exp.add_argument("--out", help="destination folder (default: RUN_DIR/export-FORMAT)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty destination")
    exp.set_defaults(func=_export)
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
