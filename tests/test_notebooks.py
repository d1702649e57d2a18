"""Every notebook runs top to bottom in its small setting (``LPA_NOTEBOOK_SMALL=1``), and is
committed without outputs."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_notebooks_exist():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_anatomy.ipynb", "03_bring_your_own_model.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stripped(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, "clear outputs before committing"


# 02_anatomy (~90 s) runs with -m slow; the quickstart and bring-your-own-model ones by default.
SLOW_NOTEBOOKS = ("02_anatomy.ipynb",)
SMALL_RUNS = [pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_NOTEBOOKS
              else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", SMALL_RUNS, ids=os.path.basename)
def test_notebook_runs_small(path, monkeypatch):
  # The kernel inherits this environment: small data, and one CPU device (as a reader has).
  monkeypatch.setenv("LPA_NOTEBOOK_SMALL", "1")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(path, as_version=4)
  # execute() raises CellExecutionError at the first cell that fails (allow_errors=False).
  NotebookClient(nb, timeout=180, kernel_name="python3", allow_errors=False,
                 resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
