"""The ``petuner`` command's options for serving and combining runs: ``export --as-lora/--energy/--for`` and the
``merge`` verb. Kept apart from ``petuner/cli.py`` so that each stays one screen."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from petuner.errors import PetunerError


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


def add_adapter_options(parser: argparse.ArgumentParser) -> None:
    """``generate``/``chat``: more runs on the same base, each a named adapter (peft's mixed batches)."""
    parser.add_argument("--adapter", action="append", metavar="NAME=RUN",
                        help="another run on the same base as adapter NAME (repeatable); a --file row picks one with "
                             "\"adapter\": NAME, default is RUN_DIR itself, base is no adapter")
    parser.add_argument("--use", metavar="NAME", help="the adapter for --prompt, or chat's first (chat: /use NAME)")


def generator(args: argparse.Namespace) -> Any:
    """The run's generator, or with ``--adapter`` one holding every named run over one base."""
    from petuner.generate import load_generator
    from petuner.multi_adapter import load_multi, parse_adapters, route

    adapters = parse_adapters(args.adapter)
    if not adapters:
        if args.use is not None:
            raise PetunerError("--use NAME picks one of several runs: name them with --adapter NAME=RUN")
        return load_generator(args.run_dir, checkpoint=args.checkpoint, trust_remote_code=args.trust_remote_code)
    if args.checkpoint not in (None, "last"):
        raise PetunerError("--checkpoint with --adapter: several runs are served with their final weights")
    gen = load_multi(args.run_dir, adapters, trust_remote_code=args.trust_remote_code)
    gen.active = route([args.use], gen.adapters)[0]
    return gen


def prompts_and_routes(args: argparse.Namespace, gen: Any) -> tuple[list[str], list[str] | None]:
    """``generate``'s prompts and, with several adapters loaded, each prompt's adapter."""
    from petuner.generate import prompt_rows
    from petuner.multi_adapter import route

    rows = prompt_rows(Path(args.file)) if args.file else [(args.prompt, args.use)]
    names = route([name or gen.active for _, name in rows], gen.adapters) if gen.adapters else None
    if names is None and any(name for _, name in rows):
        raise PetunerError(f"--file {args.file} names adapters: load them with --adapter NAME=RUN")
    return [prompt for prompt, _ in rows], names


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
