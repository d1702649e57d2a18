"""Executes the notebooks top to bottom in their full setting and saves them with their outputs,
so a reader sees tables and figures without running anything.

    python -m experiments.notebooks                      # every notebook in notebooks/
    python -m experiments.notebooks 02_anatomy.ipynb     # one

Each notebook's metadata records how its outputs were made (``lpa_jax.outputs``: the mode, a
hash of the cell sources they were made from, the code commit, the machine and the wall time);
``tests/test_notebooks.py`` checks that every committed notebook carries full-mode outputs of
its current sources and no error, and runs each in its small setting
(``LPA_NOTEBOOK_SMALL=1``) without touching the file.  Both run a notebook as Jupyter does,
in its own folder (:func:`run`).  Standard-error streams (library log lines) are dropped from
the saved outputs; an error in any cell stops with that error.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")


def _commit() -> str:
  out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                       capture_output=True, text=True)
  return out.stdout.strip() or "unknown"


def source_hash(nb) -> str:
  """SHA-256 (first 16 hex) of the notebook's cell sources: outputs made from other sources
  are stale."""
  text = "\x00".join(f"{c.cell_type}\x01{c.source}" for c in nb.cells)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def kernel_env(small: bool) -> dict[str, str]:
  """The kernel's environment: ours, with ``LPA_NOTEBOOK_SMALL`` set (``small``) or removed,
  and this checkout first on ``PYTHONPATH``.  The notebooks import ``lpa_jax`` as a user does
  (installed, ``pip install -e .``); in such a clone the path entry changes nothing, and where
  another copy is installed it makes the outputs those of the sources they are recorded with."""
  env = {k: v for k, v in os.environ.items() if k != "LPA_NOTEBOOK_SMALL"}
  if small:
    env["LPA_NOTEBOOK_SMALL"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def run(nb, path: str, small: bool, timeout: int) -> None:
  """Executes ``nb`` (read from ``path``) in place as Jupyter does: a fresh ``python3`` kernel
  whose working directory is the notebook's own folder; raises ``CellExecutionError`` at the
  first cell that fails."""
  from nbclient import NotebookClient
  folder = os.path.dirname(os.path.abspath(path))
  NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                 resources={"metadata": {"path": folder}}).execute(env=kernel_env(small))


def execute(path: str, timeout: int = 3600) -> float:
  """Runs ``path`` in full mode and writes it back with its outputs; returns the wall time."""
  import nbformat
  nb = nbformat.read(path, as_version=4)
  start = time.time()
  run(nb, path, small=False, timeout=timeout)
  wall = time.time() - start
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = [o for o in cell.outputs
                      if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
  nb.metadata["lpa_jax"] = {"outputs": {
      "mode": "full", "sources": source_hash(nb), "commit": _commit(), "wall_time_s": round(wall),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"}}
  nbformat.write(nb, path)
  return wall


def main(argv: list[str]) -> None:
  names = argv or sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
  for name in names:
    path = name if os.path.exists(name) else os.path.join(NOTEBOOK_DIR, name)
    print(f"{os.path.basename(path)}: {execute(path):.0f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
