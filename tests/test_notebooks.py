"""Every notebook is committed with the outputs of a full run (``python -m
experiments.notebooks``), and runs top to bottom in its small setting
(``LPA_NOTEBOOK_SMALL=1``)."""
import ast
import glob
import os
import sys

import nbformat
import pytest

from experiments.notebooks import run, source_hash

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_notebooks_exist():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == ["01_your_own_model.ipynb", "02_anatomy.ipynb",
                   "03_experiment_application.ipynb"]


LIBRARY_NOTEBOOKS = ("01_your_own_model.ipynb", "02_anatomy.ipynb")
LIBRARY_AND_ITS_FRIENDS = {"lpa_jax", "jax", "flax", "optax", "numpy", "matplotlib"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_imports_as_a_user_does(path):
  # No path or working-directory edits: lpa_jax is installed, and the application runs from the
  # repository root through its command line (notebook 03), never imported from a notebook.
  nb = nbformat.read(path, as_version=4)
  source = "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")
  for hack in ("sys.path", "os.chdir", "%cd", "PYTHONPATH"):
    assert hack not in source, f"{os.path.basename(path)} uses {hack}"
  nodes = list(ast.walk(ast.parse(source)))
  modules = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
  modules |= {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom)}
  assert "experiments" not in modules
  if os.path.basename(path) in LIBRARY_NOTEBOOKS:  # what a library user has, and no more
    assert modules - set(sys.stdlib_module_names) <= LIBRARY_AND_ITS_FRIENDS, modules


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


# Every notebook runs in CI, in its small setting (30-55 s each on the 2-core machine, most of
# it compiling and starting processes): what a reader opens must still run.
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_small(path, monkeypatch):
  # Small data, in the notebook's own folder, on one CPU device (as a reader has); run() raises
  # CellExecutionError at the first cell that fails.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(path, as_version=4)
  run(nb, path, small=True, timeout=600)
