"""Serve the page: loopback by default; any other address only behind a password.

The page starts processes on this machine, so an open port without authentication would be a remote
shell: ``--host`` other than a loopback address without ``--auth`` is refused before anything starts.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from petuner.errors import PetunerError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` (from --auth, else the environment) → the pair; None when neither is given."""
    from petuner.ui import AUTH_ENV

    text = auth if auth is not None else os.environ.get(AUTH_ENV)
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise PetunerError(f"--auth {'USER:...' if sep else text!r}: must be USER:PASSWORD, both non-empty")
    return user, password


def check_binding(host: str, auth: tuple[str, str] | None) -> None:
    if not is_loopback(host) and auth is None:
        raise PetunerError(f"--host {host} serves the page beyond this machine, and the page starts processes: "
                           "give --auth USER:PASSWORD (or PETUNER_UI_AUTH), or keep the default --host 127.0.0.1")


def serve(host: str, port: int, auth_text: str | None, store: str, config_dir: str | None = None) -> None:
    """Check the binding and the packages, then build and serve the page (blocks until interrupted)."""
    from petuner.extras import require

    auth = parse_auth(auth_text)
    check_binding(host, auth)
    if config_dir is not None and not Path(config_dir).is_dir():
        raise PetunerError(f"--config-dir {config_dir}: no such folder")
    require("web page")
    require("plots")  # the curves
    from petuner.ui.app import build_app

    root = Path(store).resolve()
    app = build_app(root, Path(config_dir).resolve() if config_dir else None)
    app.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, auth=auth,
                                                  allowed_paths=[str(root)], footer_links=[], quiet=False)
