"""The ``petuner`` command's options for serving and combining runs: ``export --as-lora/--energy/--for`` and the
``merge`` verb. Kept apart from ``petuner/cli.py`` so that each stays one screen."""

from __future__ import annotations

import argparse


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """``petuner export``'s conversion and serving-engine options."""
    from petuner.serving import ENGINES

    parser.add_argument("--as-lora", action="store_true",
                        help="convert any method to one plain LoRA (truncated SVD with --rank R or --energy E; "
                             "exact for LoRA-shaped methods); writes as_lora.json with the relative errors")
    parser.add_argument("--energy", type=float,
                        help="with --as-lora: keep per matrix the fewest singular values holding this share of "
                             "the squared spectrum (e.g. 0.99)")
    parser.add_argument("--for", dest="engine", choices=ENGINES,
                        help="check the peft folder against this serving engine's rules and write its command")


def export_options(args: argparse.Namespace) -> dict[str, object]:
    """The keyword arguments of ``petuner.export.export`` these options give."""
    return {"as_lora": args.as_lora, "energy": args.energy, "engine": args.engine}


def _merge(args: argparse.Namespace) -> None:
    from petuner.merge import merge_runs

    print(merge_runs(args.runs, args.out, method=args.method, weights=args.weights, density=args.density,
                     seed=args.seed, rank=args.rank, force=args.force))


def add_merge_command(commands: argparse._SubParsersAction) -> None:
    """``petuner merge RUN_A RUN_B ... --method M --weights ... [--density D] --out RUN``."""
    from petuner.choices import MERGE_METHODS

    merge = commands.add_parser("merge", help="combine several runs on one base into a new run folder "
                                              "(linear, cat, svd, task arithmetic, TIES, DARE)")
    merge.add_argument("runs", nargs="+", help="run folders trained on the same base model")
    merge.add_argument("--method", default="linear", help=f"one of {', '.join(MERGE_METHODS)} (default linear)")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per run (default 1/number of runs)")
    merge.add_argument("--density", type=float, help="ties, dare_*: the share of each update kept, in (0, 1]")
    merge.add_argument("--seed", type=int, default=0, help="dare_*: the seed of the random drop (default 0)")
    merge.add_argument("--rank", type=int, help="svd: the rank of the result (default: the largest input rank)")
    merge.add_argument("--out", required=True, help="the new run folder")
    merge.add_argument("--force", action="store_true", help="replace a non-empty --out")
    merge.set_defaults(func=_merge)
