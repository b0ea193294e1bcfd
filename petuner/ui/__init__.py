"""``petuner ui``: a local web page to compose, launch, watch, compare, chat with and export runs.

The page builds command lines and reads run folders; runs are separate processes (``petuner.ui.launcher``).
This module only declares the command: Gradio (the ``petuner[ui]`` extra) is imported when it serves.
"""

from __future__ import annotations

import argparse
from typing import Any

AUTH_ENV = "PETUNER_UI_AUTH"  # USER:PASSWORD, kept out of the process list


def add_parser(commands: Any) -> None:
    """The ``ui`` verb of ``petuner`` (``commands``: the CLI's subparsers)."""
    ui = commands.add_parser("ui", help="serve the web page: compose, launch, watch, compare, chat with and "
                                        "export runs (binds 127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (default 127.0.0.1; any other needs --auth)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--auth", help=f"USER:PASSWORD the page asks for (or ${AUTH_ENV}); required off loopback")
    ui.add_argument("--store", default="adapters", help="the run store: where runs are written and found")
    ui.add_argument("--config-dir", help="your own config folder, as for petuner train (its choices join the menus)")
    ui.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from petuner.ui.serve import serve

    serve(args.host, args.port, args.auth, args.store, args.config_dir)
