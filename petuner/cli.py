"""The ``petuner`` command: train, and everything around a run (its data, its configs, what it became).

``petuner train`` is a Hydra application (petuner/train_command.py): its arguments go to Hydra untouched, so it
is dispatched before argparse reads anything. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petuner.choices import DIRECTIONS, EXPORT_FORMATS, GGUF_DTYPES
from petuner.cli_serve import add_adapter_options, add_export_options, add_merge_command
from petuner.errors import PetunerError
from petuner.ui import add_parser as add_ui_parser


def _export(args: argparse.Namespace) -> None:
    from petuner.cli_serve import export_options
    from petuner.export import export

    suffix = ".gguf" if args.format.startswith("gguf") else ""
    out = export(args.run_dir, args.format, args.out or f"{args.run_dir.rstrip('/')}/export-{args.format}{suffix}",
                 force=args.force, rank=args.rank, checkpoint=args.checkpoint, dtype=args.dtype,
                 trust_remote_code=args.trust_remote_code, **export_options(args))
    print(out)


def _sampling(args: argparse.Namespace) -> Any:
    from petuner.generate import Sampling

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()
    return sampling


def _generate(args: argparse.Namespace) -> None:
    from petuner.cli_serve import generator, prompts_and_routes
    from petuner.generate import generate_file

    if (args.prompt is None) == (args.file is None):
        raise PetunerError("give either --prompt TEXT or --file prompts.jsonl (with --out answers.jsonl)")
    if args.file is not None and args.out is None:
        raise PetunerError("--file needs --out answers.jsonl")
    if args.batch_size < 1:
        raise PetunerError(f"--batch-size {args.batch_size}: must be >= 1")
    sampling = _sampling(args)
    gen = generator(args)
    prompts, names = prompts_and_routes(args, gen)
    if args.file:
        generate_file(gen, prompts, Path(args.out), sampling, args.batch_size, names)
        print(args.out)
    else:
        print(gen.answer(prompts, sampling, names)[0])


def _chat(args: argparse.Namespace) -> None:
    from petuner.cli_serve import generator
    from petuner.generate import chat

    sampling = _sampling(args)
    gen = generator(args)
    print("chatting with", args.run_dir, "(/reset clears the history, /exit or Ctrl-D leaves)", file=sys.stderr)
    chat(gen, sampling, sys.stdin, sys.stdout)


def _eval(args: argparse.Namespace) -> None:
    from petuner.evaluate import evaluate_run

    if args.batch_size < 1:
        raise PetunerError(f"--batch-size {args.batch_size}: must be >= 1")
    out, report = evaluate_run(args.run_dir, args.overrides, split=args.split, batch_size=args.batch_size,
                               checkpoint=args.checkpoint, trust_remote_code=args.trust_remote_code)
    print("  ".join(f"{k}={v:.4f}" for k, v in report.items() if k.startswith("eval/")),
          f"({report['examples']} examples)")
    print(out)


def _loading_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every command that loads a run shares."""
    parser.add_argument("run_dir", help="a run folder (adapters/<run>) or a petuner export")
    parser.add_argument("--checkpoint", help="best, last (default) or step-N: which of a run folder's weights")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own Python code to run (only for folders you trust)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def _eval_ranks(args: argparse.Namespace) -> None:
    from petuner.rank_eval import eval_ranks

    for row in eval_ranks(args.run_dir, args.out):
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def _sweep_report(args: argparse.Namespace) -> None:
    from petuner.sweep import sweep_report

    print(sweep_report(args.sweep_dir, args.objective, args.out).read_text())


def _data(args: argparse.Namespace) -> None:
    """Build the data exactly as ``python train.py <overrides>`` would (tokenizer only, no weights) and show it."""
    from petuner.data.report import describe
    from petuner.ui.preview import prepared_data

    print(describe(*prepared_data(args.overrides, Path(args.config_dir) if args.config_dir else None), args.examples))


def _init(args: argparse.Namespace) -> None:
    from petuner.starter import EXPERIMENT, init

    for path in init(Path(args.folder), args.model):
        print(path)
    print(f"train it: petuner train --config-dir {args.folder} experiment={EXPERIMENT}", file=sys.stderr)


def _ls(args: argparse.Namespace) -> None:
    from petuner.starter import list_choices

    print(list_choices(Path(args.config_dir) if args.config_dir else None))


def _completion(args: argparse.Namespace) -> None:
    from petuner.completion import bash_script

    print(bash_script(build_parser()._subparsers._group_actions[0].choices), end="")  # every verb, as parsed


def _config_args(commands: Any) -> None:
    """``train`` (listed here for --help; Hydra parses its arguments), ``init`` and ``ls``."""
    commands.add_parser("train", add_help=False, help="train a run or a -m sweep: petuner train [--config-dir "
                        "DIR] [Hydra flags] key=value ... (petuner train --help: Hydra's help)")
    init = commands.add_parser("init", help="write a starter config folder (model, data, experiment) that trains")
    init.add_argument("folder", nargs="?", default="myconf", help="where to write it (default: myconf)")
    init.add_argument("--model", default="smollm2_135m", help="the shipped model config to copy (default smollm2_135m)")
    init.set_defaults(func=_init)
    listing = commands.add_parser("ls", help="list every config group's choices, shipped and your --config-dir's")
    listing.add_argument("--config-dir", help="your own config folder, as for petuner train")
    listing.set_defaults(func=_ls)
    completion = commands.add_parser("completion", help="print a shell completion script: "
                                                        "eval \"$(petuner completion bash)\"")
    completion.add_argument("shell", choices=("bash",))
    completion.set_defaults(func=_completion)


def build_parser() -> argparse.ArgumentParser:
    from petuner import __version__

    parser = argparse.ArgumentParser(prog="petuner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"petuner {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _config_args(commands)
    gen = commands.add_parser("generate", help="answer prompts with a trained run (batched)")
    _loading_args(gen)
    gen.add_argument("--prompt", help="one prompt; the answer is printed")
    gen.add_argument("--file", help="prompts.jsonl: one {\"prompt\": ...} per line")
    gen.add_argument("--out", help="answers.jsonl for --file: {prompt, response} per line")
    gen.add_argument("--batch-size", type=int, default=8)
    add_adapter_options(gen)
    _sampling_args(gen)
    gen.set_defaults(func=_generate)
    talk = commands.add_parser("chat", help="talk to a trained run on stdin, answers streamed")
    _loading_args(talk)
    add_adapter_options(talk)
    _sampling_args(talk)
    talk.set_defaults(func=_chat)
    ev = commands.add_parser("eval", help="held-out loss, perplexity or accuracy on other data (data=... overrides)")
    _loading_args(ev)
    ev.add_argument("overrides", nargs="*", help="data=... and data.*=... as for train.py")
    ev.add_argument("--split", default="eval", help="eval (default: the held-out split training would make) or all")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=_eval)
    exp = commands.add_parser("export", help="write a run as a peft folder, a merged HF model or a GGUF file")
    _loading_args(exp)
    exp.add_argument("--format", choices=EXPORT_FORMATS, default="peft")
    exp.add_argument("--dtype", choices=GGUF_DTYPES, help="GGUF tensor type (default f16)")
    exp.add_argument("--out", help="destination folder, or file for gguf (default: RUN_DIR/export-FORMAT)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty destination")
    exp.add_argument("--rank", type=int, help="export a rank-dynamic adapter (dylora) truncated to this rank, or "
                                              "with --as-lora the rank of the truncated SVD")
    add_export_options(exp)
    exp.set_defaults(func=_export)
    add_merge_command(commands)
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
    data.add_argument("--config-dir", help="your own config folder, as for petuner train")
    data.add_argument("--examples", type=int, default=2, help="how many training examples to decode (default 2)")
    data.set_defaults(func=_data)
    add_ui_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from petuner.train_command import main as train

        train(argv[1:])
        return 0
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
