"""Every notebook in notebooks/ executes top to bottom, and is stored with its outputs cleared."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow  # runs every notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("PSNR" in o.get("text", "") for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_cleared(path):
    """Notebooks are committed without outputs (clear them in Jupyter, or with nbformat: every code cell
    with outputs [] and execution_count None)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    stored = [i for i, c in enumerate(nb.cells)
              if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not stored, f"{path.name}: cells {stored} have stored outputs; clear them before committing"


def test_there_are_notebooks():
    assert {"quickstart.ipynb", "policies.ipynb", "benchmark_analysis.ipynb"} <= {p.name for p in NOTEBOOKS}
