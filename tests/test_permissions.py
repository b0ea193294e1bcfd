"""Files petuner writes get the umask's mode, as a plain ``open()`` would (0644 under umask 0022), not
tempfile's 0600: a serving engine or a colleague running as another user must be able to read an export.

Seen failing before the fix in petuner/io.py: every atomically written file was -rw------- (0600) and
every atomically written folder drwx------ (0700).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from petuner.export import export


@pytest.fixture
def umask_0022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and folder under ``root`` (and ``root`` itself if it is a folder)."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_a_run_and_every_export_are_readable_by_others_under_umask_0022(umask_0022, tmp_path) -> None:
    from petuner.run import run
    from tests.conftest import make_cfg

    run_dir = tmp_path / "run"
    run(make_cfg(run_dir, "trainer.max_steps=3", "trainer.save_every=3", "trainer.eval_every=3"))
    from petuner.merge import merge_runs

    written = [run_dir, export(run_dir, "peft", tmp_path / "peft", engine="vllm"),
               export(run_dir, "merged", tmp_path / "merged"), export(run_dir, "gguf", tmp_path / "model.gguf"),
               export(run_dir, "gguf-lora", tmp_path / "adapter.gguf"),
               merge_runs([run_dir], tmp_path / "merged-run", weights=[1.0])]
    found = {k: v for root in written for k, v in modes(root).items()}
    assert any(k.endswith("adapter.safetensors") for k in found) and any(k.endswith("run.json") for k in found)
    executable = {"peft/serve-vllm.sh"}  # written executable: 0755 as a plain chmod +x under umask 0022
    wrong = {k: oct(v) for k, v in found.items()
             if v != (0o755 if (tmp_path / k).is_dir() or k in executable else 0o644)}
    assert not wrong, wrong
