"""notebooks/quickstart.ipynb runs from top to bottom (one epoch, outputs into a temporary folder)."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_the_quickstart_notebook_executes_without_a_cell_error(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    settings = notebook.cells[1]
    assert settings.source.startswith("# settings")
    settings.source = f'EPOCHS = 1\nSEED = 0\nOUTPUT = "{tmp_path / "run"}"'
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "mean OOD degree" in text and "written:" in text
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "motion_a_xi.nii.gz").is_file()
    images = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2  # the overlays and the histograms
