"""Every notebook in notebooks/ runs top to bottom, its plots render, and none is committed with outputs.

Each notebook runs in a fresh ipykernel (nbclient), after a cell that overrides some of its "parameters" cell (as
papermill injects them) to shrink workloads that take minutes on a laptop. A notebook's whole run is bounded in time:
a kill, not a timing assertion.
"""

from __future__ import annotations

import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
TIME_BOUND_S = 600  # per notebook; each takes ~20-90 s with the default model on 2 busy cores

# Values that keep CI short; every key must be a parameter of that notebook.
OVERRIDES = {
    "quickstart": {"MAX_TOKENS": 16},
    "sampling": {"DRAWS": 64},
    "research": {"NEW_TOKENS": 6},
    "memory": {"NUM_PAGES": 48, "NUM_REQUESTS": 8, "MAX_TOKENS": 24},
}


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _parameters_index(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def _with_overrides(nb, overrides: dict):
    index = _parameters_index(nb)
    source = nb.cells[index].source
    for key in overrides:
        assert f"\n{key} = " in "\n" + source, f"{key} is not a parameter of this notebook"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def test_notebooks_found():
    assert {_name(p) for p in NOTEBOOKS} >= {"quickstart", "sampling", "research", "serving", "memory"}


def _cells_with_outputs(nb) -> list[int]:
    return [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert _cells_with_outputs(nb) == [], "strip the outputs (jupyter nbconvert --clear-output --inplace)"


def test_output_check_sees_outputs():
    cell = nbformat.v4.new_code_cell(
        "1 + 1", execution_count=1, outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "2"})]
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), cell])
    assert _cells_with_outputs(nb) == [1]


def test_overrides_name_parameters():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("MODEL = None\nSTEPS = 8")])
    nb.cells[0].metadata["tags"] = ["parameters"]
    injected = _with_overrides(nb, {"STEPS": 2}).cells[1]
    assert injected.source == "STEPS = 2" and injected.metadata["tags"] == ["injected-parameters"]
    with pytest.raises(AssertionError, match="not a parameter"):
        _with_overrides(nb, {"STEP": 2})


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_runs(path):
    nb = _with_overrides(nbformat.read(path, as_version=4), OVERRIDES.get(_name(path), {}))
    deadline = time.monotonic() + TIME_BOUND_S
    client = NotebookClient(
        nb,
        kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOK_DIR}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
    )
    client.execute()  # raises CellExecutionError on the first failing cell, TimeoutError past the bound
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "plt.show()" in cell.source:
            assert any("image/png" in out.get("data", {}) for out in cell.outputs), f"cell {i} drew no image"
