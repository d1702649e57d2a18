"""Executes the notebooks top to bottom in their full setting and saves them with their outputs,
so a reader sees tables and figures without running anything.

    python -m experiments.notebooks                      # every notebook in notebooks/
    python -m experiments.notebooks 02_anatomy.ipynb     # one

Each notebook's metadata records how its outputs were made (``lpa_jax.outputs``: the mode, a
hash of the cell sources they were made from, the code commit, the machine and the wall time);
``tests/test_notebooks.py`` checks that every committed notebook carries full-mode outputs of
its current sources and no error, and runs each in its small setting
(``LPA_NOTEBOOK_SMALL=1``) without touching the file.  Standard-error streams (library log
lines) are dropped from the saved outputs; an error in any cell stops with that error.
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


def execute(path: str, timeout: int = 3600) -> float:
  """Runs ``path`` in full mode and writes it back with its outputs; returns the wall time."""
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(path, as_version=4)
  env_small = os.environ.pop("LPA_NOTEBOOK_SMALL", None)
  start = time.time()
  try:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
  finally:
    if env_small is not None:
      os.environ["LPA_NOTEBOOK_SMALL"] = env_small
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
