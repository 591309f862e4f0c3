"""The Colab tour notebook runs top to bottom in a fresh kernel, and is committed with its outputs.

The kernel is "python3": jupyter_client resolves it to the interpreter running the tests (the
venv's ipykernel, whether or not a kernelspec file is installed), so the notebook imports the
same adamx as the tests.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (test extra)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (test extra)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (test extra)")
pytest.importorskip("flax", reason="the notebook trains a Flax MLP (examples extra)")
pytest.importorskip("sklearn", reason="the notebook uses scikit-learn's digits (examples extra)")
pytest.importorskip("matplotlib", reason="the notebook draws figures (examples extra)")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "adamx_tour.ipynb"


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_shows_outputs_and_figures_without_errors():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [out for cell in code_cells(notebook) for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 10, "the committed notebook should carry its figures"


def test_notebook_runs_top_to_bottom_in_a_fresh_kernel():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first failing cell
    cells = code_cells(notebook)
    assert all(cell.execution_count is not None for cell in cells)
    text = "".join(out.get("text", "") for cell in cells for out in cell.outputs)
    assert "mu matches m: True | nu matches v: True" in text
