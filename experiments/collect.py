"""Copies a sweep root's finished records into the repository, never its checkpoints.

A long sweep runs from a worktree pinned to one commit, into a root outside the repository
(``experiments/sweep_shards.sh``); its finished runs are committed as they finish.  This copies,
for every run of ``SRC/runs/<method>/seed<k>/`` that is finished (``results.json``) or was
stopped by a guard (``stopped.json``), the files a report needs — config, method, results,
metrics, per-sample predictions, the stop record — and the suite's ``suite.json`` (its
``seeds``: those the destination's records hold), into
``DEST`` (default ``experiments/results/<suite>``).  Unfinished runs and checkpoints, TensorBoard
logs and lock files stay behind.  Then write the report with ``--report``.

    python -m experiments.collect /work/sweeps/fmnist_lt_main --report
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

RECORDS = ("config.json", "method.json", "results.json", "metrics.jsonl", "predictions.npz",
           "stopped.json")
DONE = ("results.json", "stopped.json")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def finished_runs(src: str) -> list[str]:
  """``runs/<method>/seed<k>`` paths under ``src`` that hold ``results.json`` or
  ``stopped.json``, sorted."""
  out = []
  runs = os.path.join(src, "runs")
  for method in sorted(os.listdir(runs)) if os.path.isdir(runs) else ():
    for seed in sorted(os.listdir(os.path.join(runs, method))):
      rel = os.path.join("runs", method, seed)
      if any(os.path.exists(os.path.join(src, rel, f)) for f in DONE):
        out.append(rel)
  return out


def collect(src: str, dest: str | None = None) -> tuple[str, list[str]]:
  """Copies ``src``'s finished records into ``dest``; returns ``(dest, copied run paths)``.

  A destination run whose records differ from the source's is replaced whole, so a run redone
  in the sweep (``--stale=rerun``) leaves no file of its earlier version behind.
  """
  with open(os.path.join(src, "suite.json")) as f:
    meta = json.load(f)
  dest = dest or os.path.join(RESULTS, meta["suite"])
  runs = finished_runs(src)
  if not runs:
    raise FileNotFoundError(f"No finished runs under {src}/runs (nothing holds "
                            f"{' or '.join(DONE)})")
  os.makedirs(dest, exist_ok=True)
  for rel in runs:
    target = os.path.join(dest, rel)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    for name in RECORDS:
      path = os.path.join(src, rel, name)
      if os.path.exists(path):
        shutil.copy2(path, os.path.join(target, name))
  _write_suite(meta, dest)
  return dest, runs


def _write_suite(meta: dict, dest: str) -> None:
  """The sweep's ``suite.json`` ``meta`` into ``dest``, with ``seeds`` the seeds ``dest``'s
  records hold (a sweep writes those of its own invocation, e.g. one ``--seeds`` slice)."""
  from experiments.train.workdir import write_json_atomic
  seeds = {int(s.removeprefix("seed")) for rel in finished_runs(dest)
           for s in [os.path.basename(rel)]}
  meta["seeds"] = sorted(seeds)
  write_json_atomic(os.path.join(dest, "suite.json"), meta)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.collect",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("src", help="the sweep root (holds suite.json and runs/)")
  parser.add_argument("--dest", default=None, help="where the records go (default "
                      "experiments/results/<suite>, the suite named in SRC/suite.json)")
  parser.add_argument("--report", action="store_true",
                      help="write DEST's report (report.md, results.csv, figures)")
  args = parser.parse_args(argv)
  dest, runs = collect(args.src, args.dest)
  print(f"{len(runs)} finished runs copied to {dest}")
  if args.report:
    from experiments import report
    # A path relative to the working directory (the repository, run from its root), so the
    # report's "regenerate" line works in any checkout.
    rel = os.path.relpath(dest)
    report.write_report(dest if rel.startswith("..") else rel)
    print(f"report written: {os.path.join(dest, 'report.md')}")


if __name__ == "__main__":
  main()
