"""The notebooks run top to bottom (with tiny models passed as parameters, papermill-style)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TINY = {
    "quickstart.ipynb": 'MODEL = "tiny_llama"\nSTEPS = 4\nBATCH = 4\nWORKDIR = "{work}"',
    "compare_methods.ipynb": 'CLS_MODEL = "tiny_bert"\nLM_MODEL = "tiny_llama"\nSTEPS = 4\nLQ_BITS = [3, 4]\n'
                             'WORKDIR = "{work}"',
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name: str, tmp_path) -> None:
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    (index,) = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    injected = nbformat.v4.new_code_cell(TINY[name].format(work=tmp_path / "work"))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, [(e["ename"], e["evalue"]) for e in errors]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= (1 if name == "quickstart.ipynb" else 4)
