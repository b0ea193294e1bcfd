"""Atomic file and folder writes, and the run folder's file names: one module every layer may import.

A crash or kill never leaves a half-written checkpoint or export: everything is written under a
temporary name in the destination's parent folder, flushed with fsync, then renamed into place
(``os.replace`` is atomic on POSIX within one file system). ``tempfile`` creates its files 0600 and its
folders 0700 whatever the umask, and so does safetensors' ``save_file`` (it writes through a temporary file
of its own); before the rename every written file and folder is given the mode a plain ``open()`` / ``mkdir``
would have given it (0644 / 0755 under umask 0022), so a serving engine or a colleague running as another
user can read what petuner wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# A run folder (see petuner/run_folder.py for what each holds).
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
ADAPTER_FILE = "adapter.safetensors"  # in the run folder and in each checkpoint
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"  # a checkpoint's optimizer, scheduler, scaler, hook and RNG states


def current_umask() -> int:
    """The process umask (read by setting it and setting it straight back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(root: Path) -> None:
    """Give ``root`` (a file, or a folder and all it holds) the modes ``open()`` / ``mkdir`` would have given
    it; a file its writer made executable (user x bit) stays executable."""
    mask = current_umask()
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        executable = path.is_dir() or path.stat().st_mode & stat.S_IXUSR
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors as safetensors (detached, contiguous, on the CPU); wrap in ``atomic_file`` for atomicity."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(dest: Path | str, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` only if the block finishes without error.

    With ``replace=True`` an existing ``dest`` is swapped out after the new folder is complete;
    otherwise an existing ``dest`` is an error raised by the caller before any work.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        plain_modes(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            if not replace:
                raise FileExistsError(dest)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path that replaces ``dest`` (fsynced) only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        plain_modes(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(dest: Path | str, text: str) -> None:
    with atomic_file(dest) as tmp:
        tmp.write_text(text)


def atomic_write_json(dest: Path | str, obj: Any) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file; one line for bad JSON."""
    from petuner.errors import PetunerError

    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise PetunerError(f"{path}:{number}: not valid JSON ({err.msg})") from None
