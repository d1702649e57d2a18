"""Compare two roots of the same suite run by run: are the results the same?

  python -m experiments.compare experiments/results/noisy_fmnist /tmp/noisy_rerun

Prints one line per run present in both roots (test accuracy on each side, and whether the
per-class accuracies — and, where both runs saved them, the per-sample test and validation
predictions — are identical) and exits 1 if any differ, so a rerun of a committed suite can
be checked for bit-identical results.
"""
from __future__ import annotations

import json
import os
import sys


def runs(root: str) -> dict[str, dict]:
  """``{"<method>/<seed>": results}`` for every readable ``results.json`` under ``root/runs``."""
  out = {}
  base = os.path.join(root, "runs")
  for method in sorted(os.listdir(base)) if os.path.isdir(base) else []:
    for seed in sorted(os.listdir(os.path.join(base, method))):
      path = os.path.join(base, method, seed, "results.json")
      try:
        with open(path) as f:
          out[f"{method}/{seed}"] = json.load(f)
      except (OSError, json.JSONDecodeError):
        continue
  return out


def same_predictions(a_dir: str, b_dir: str) -> bool:
  """Whether two runs' ``predictions.npz`` hold the same arrays (True when either lacks it)."""
  import numpy as np
  paths = [os.path.join(d, "predictions.npz") for d in (a_dir, b_dir)]
  if not all(os.path.exists(p) for p in paths):
    return True
  with np.load(paths[0]) as x, np.load(paths[1]) as y:
    return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k])
                                                      for k in x.files)


def compare(a_root: str, b_root: str) -> list[tuple[str, float, float, bool]]:
  """``[(run, test_acc_a, test_acc_b, identical)]`` for the runs both roots hold."""
  a, b = runs(a_root), runs(b_root)
  rows = []
  for key in sorted(set(a) & set(b)):
    same = (a[key]["test_accuracy"] == b[key]["test_accuracy"]
            and a[key]["per_class_accuracy"] == b[key]["per_class_accuracy"]
            and same_predictions(os.path.join(a_root, "runs", key),
                                 os.path.join(b_root, "runs", key)))
    rows.append((key, a[key]["test_accuracy"], b[key]["test_accuracy"], same))
  return rows


def main(argv) -> int:
  if len(argv) != 3:
    print(__doc__)
    return 2
  rows = compare(argv[1], argv[2])
  if not rows:
    print("no run is present in both roots")
    return 1
  print(f"| run | {argv[1]} | {argv[2]} | identical |\n|---|---|---|---|")
  for key, x, y, same in rows:
    print(f"| {key} | {100 * x:.2f} | {100 * y:.2f} | {'yes' if same else 'NO'} |")
  differ = [r for r in rows if not r[3]]
  print(f"\n{len(rows) - len(differ)} of {len(rows)} runs identical")
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
