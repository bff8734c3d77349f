"""Every notebook in notebooks/ runs top to bottom without a cell error, and is stored clean.

The notebooks are executed with nbclient on the ``python3`` kernel. That kernelspec comes with
ipykernel (installed into the venv's ``share/jupyter/kernels``); its command is ``python -m
ipykernel_launcher``, which jupyter_client runs with the interpreter of the launching process,
so the kernel is the venv's Python that runs pytest (checked below). The walkthrough captures a
short trace from the real model on first use (about a minute, then cached), so it needs the
``capture`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
TIMEOUT_S = 600  # per cell; the first capture of the walkthrough's trace takes about a minute

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _execute(nb, cwd: Path):
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(cwd)}},
    )
    return client.execute()


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


def test_kernel_runs_the_interpreter_of_the_tests():
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")]
    )
    _execute(nb, REPO_ROOT)
    printed = nb.cells[0].outputs[0]["text"].strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.skipif(not HAVE_TORCH, reason="the notebooks capture a trace: needs the capture "
                    "extra (torch), pip install -e '.[capture]'")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    # a CellExecutionError names the cell and carries its traceback
    _execute(nb, NOTEBOOK_DIR)  # the directory a user opens the notebook from
    errors = [
        output for cell in nb.cells if cell.cell_type == "code"
        for output in cell.outputs if output.get("output_type") == "error"
    ]
    assert not errors
