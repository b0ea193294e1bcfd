"""Start, abort and resume runs as detached processes: the page only launches commands and sends signals.

A run is its own process session (``start_new_session``), its output in ``RUN_DIR/console.log`` and its
launch in ``RUN_DIR/launch.json``: closing the browser or restarting the UI server does not touch it, and a
restarted UI finds it again by scanning the store. Abort sends SIGTERM to the run's process group (torchrun
and its workers alike); the run checkpoints its last finished step and ends (``petuner.train.abort``).
Resume starts the same command with ``trainer.resume=true`` in the same folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from petuner.errors import PetunerError
from petuner.io import atomic_write_json

LAUNCH_FILE = "launch.json"  # argv, pid, process group, start time of the run's latest process
CONSOLE_FILE = "console.log"  # the process's stdout and stderr
_children: dict[int, subprocess.Popen[bytes]] = {}  # this server's own launches, reaped when they end


def train_command(overrides: Sequence[str], processes: int = 1, config_dir: Path | None = None) -> list[str]:
    """The argv of one run: ``petuner train`` with these overrides, under torchrun for several processes."""
    train = ["-m", "petuner", "train", *(["--config-dir", str(config_dir)] if config_dir else []), *overrides]
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *train]
    return [sys.executable, *train]


def shown_command(argv: Sequence[str]) -> str:
    """``argv`` as a user types it: ``petuner train ...`` / ``torchrun ... -m petuner train ...``."""
    import shlex

    words = list(argv)
    if words[1:3] == ["-m", "torch.distributed.run"]:
        return shlex.join(["torchrun", *words[3:]])
    return shlex.join(["petuner", *words[3:]] if words[1:3] == ["-m", "petuner"] else words)


def new_run_dir(store: Path, choices: dict[str, object]) -> Path:
    """``STORE/<model>_<adapter>_<time>`` as train.py names it, made unique."""
    base = store / f"{choices.get('model')}_{choices.get('adapter')}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def start(run_dir: Path, overrides: Sequence[str], processes: int = 1, config_dir: Path | None = None) -> list[str]:
    """Launch a run writing ``run_dir`` (Hydra's output folder); returns its argv."""
    argv = train_command([*overrides, f"hydra.run.dir={run_dir}"], processes, config_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CONSOLE_FILE, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=os.getcwd())
    atomic_write_json(run_dir / LAUNCH_FILE, {"argv": argv, "overrides": list(overrides), "processes": processes,
                                              "config_dir": str(config_dir) if config_dir else None,
                                              "pid": process.pid, "started": time.time()})
    _children[process.pid] = process
    return argv


def read_launch(run_dir: Path) -> dict[str, object] | None:
    path = run_dir / LAUNCH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_running(run_dir: Path) -> bool:
    """The run's launched process is alive (and is that run's: a reused pid runs another command line)."""
    launch = read_launch(run_dir)
    if launch is None:
        return False
    pid = int(launch["pid"])  # type: ignore[call-overload]
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return f"hydra.run.dir={run_dir}" in cmdline


def abort(run_dir: Path) -> None:
    """SIGTERM to the run's process group: it checkpoints its last finished step and ends."""
    if not is_running(run_dir):
        raise PetunerError(f"{run_dir} is not running")
    os.killpg(int(read_launch(run_dir)["pid"]), signal.SIGTERM)  # type: ignore[arg-type,index]


def resume(run_dir: Path) -> list[str]:
    """Start the run's own overrides again in its folder, with trainer.resume=true."""
    launch = read_launch(run_dir)
    if launch is None:
        raise PetunerError(f"{run_dir} was not launched from the page (no {LAUNCH_FILE}): resume it with "
                           f"petuner train ... trainer.resume=true hydra.run.dir={run_dir}")
    if is_running(run_dir):
        raise PetunerError(f"{run_dir} is still running")
    if not (run_dir / "checkpoints").is_dir():
        raise PetunerError(f"{run_dir} has no checkpoint to resume from")
    overrides = [o for o in launch["overrides"] if not o.startswith("trainer.resume=")]  # type: ignore[attr-defined]
    config_dir = Path(str(launch["config_dir"])) if launch.get("config_dir") else None
    return start(run_dir, [*overrides, "trainer.resume=true"], int(launch["processes"]),  # type: ignore[call-overload]
                 config_dir)
