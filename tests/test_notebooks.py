"""Every notebook is committed with the outputs of a full run (``python -m
experiments.notebooks``), and runs top to bottom in its small setting
(``LPA_NOTEBOOK_SMALL=1``)."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from experiments.notebooks import source_hash

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_notebooks_exist():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == ["01_your_own_model.ipynb", "02_anatomy.ipynb",
                   "03_experiment_application.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_keeps_the_outputs_of_a_full_run(path):
  # A reader sees results without running anything: every code cell ran, in order, in the
  # full setting (not the CI smoke setting), and none failed.
  nb = nbformat.read(path, as_version=4)
  made = nb.metadata.get("lpa_jax", {}).get("outputs", {})
  assert made.get("mode") == "full", "rerun: python -m experiments.notebooks " + \
      os.path.basename(path)
  assert made.get("sources") == source_hash(nb), "cells edited since their outputs were " \
      "made: rerun python -m experiments.notebooks " + os.path.basename(path)
  counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  assert None not in counts and counts == sorted(counts), "cells not all run, in order"
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  if any("plt." in c.source for c in nb.cells if c.cell_type == "code"):
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure in the outputs"


# 02_anatomy (~90 s) runs with -m slow; the other two by default.
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
