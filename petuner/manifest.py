"""Checksum manifests: what a run or an export wrote, so that loading detects corruption or tampering.

``petuner_manifest.json`` lists every file's SHA-256 and size plus a few facts needed to load the
folder again (for exports: the base model's config, the task, the labels). ``verify_manifest``
re-hashes the files before anything is deserialised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from petuner.errors import PetunerError
from petuner.io import atomic_write_json

MANIFEST = "petuner_manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, meta: dict[str, Any], files: Iterable[str] | None = None) -> None:
    """Hash ``files`` (default: every file under ``folder``) into ``folder/petuner_manifest.json``."""
    names = sorted(files) if files is not None else sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {name: {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names}
    atomic_write_json(folder / MANIFEST, {**meta, "files": entries})


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def verify_manifest(folder: Path) -> dict[str, Any] | None:
    """Check every listed file; returns the manifest (None if the folder has none)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise PetunerError(f"{path} is listed in {MANIFEST} but missing: the folder is incomplete")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise PetunerError(f"{path} does not match its checksum in {MANIFEST}: corrupt or modified")
    return manifest
