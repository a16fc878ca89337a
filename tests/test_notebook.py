"""The quick-start notebook runs end to end, offline, so it cannot rot."""

import pathlib

import nbformat
from nbclient import NotebookClient

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # Point the notebook at a folder without a checkpoint, so it builds the tiny model whatever the machine has.
    monkeypatch.delenv("CROBIM_U_MODEL", raising=False)
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "the overlay was not displayed"
    text = "".join(output.get("text", "") for output in outputs)
    assert "M parameters" in text and "score" in text
