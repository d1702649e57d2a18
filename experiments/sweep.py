"""Sweep runner: a suite's methods × seeds, each run in its own work dir, then the report.

  python -m experiments.sweep --config=experiments/configs/suites.py:longtail_fmnist
  python -m experiments.sweep --config=experiments/configs/suites.py:all --seeds=0
  python -m experiments.sweep --config=experiments/configs/suites.py:smoke --root=/tmp/smoke

Layout of a suite root (default ``experiments/results/<suite>``)::

  suite.json                       the suite as run (methods, seeds, task, machine)
  runs/<method-slug>/seed<k>/      method.json, metrics.jsonl, results.json
  report.md, results.csv, *.png    written by :mod:`experiments.report`

Finished runs (``results.json`` present) are skipped; an interrupted run resumes from its
checkpoint.  Once a run finishes its ``checkpoints/`` and ``tensorboard/`` dirs are deleted,
so the committed results stay small.  The dataset is loaded once per suite and shared.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import platform
import re
import shutil
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/suites.py:smoke",
                                "Suite config, e.g. experiments/configs/suites.py:longtail_fmnist")
flags.DEFINE_string("root", None, "Suite root (default experiments/results/<suite>); with "
                    "several suites, the parent of their roots.")
flags.DEFINE_list("seeds", None, "Override the suite's seeds, e.g. --seeds=0,1.")
flags.DEFINE_bool("progress", True, "Show the overall progress bar.")
flags.DEFINE_bool("report", True, "Write the report after the runs.")

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
META_KEYS = ("name", "point")  # method-dict keys that are labels, not config overrides


def slug(name: str) -> str:
  """A method's directory name: ``"LPA+LPL"`` -> ``"lpa-lpl"``, ``"LPA @ stage1"`` ->
  ``"lpa-stage1"``."""
  return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "method"


def task_config(task: str):
  """``"longtail.py:quick"`` -> that task's ConfigDict (``get_config(variant)``)."""
  fname, _, variant = task.partition(":")
  module = importlib.import_module(f"experiments.configs.{fname.removesuffix('.py')}")
  return module.get_config(variant) if variant else module.get_config()


def apply_overrides(config, overrides) -> None:
  """Sets dotted ``key: value`` pairs, as ``--config.key=value`` would; unknown keys fail
  with the valid ones listed."""
  for key, value in dict(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"Unknown config field {key!r}; {'.'.join(parents) or 'config'} has "
                     f"{', '.join(sorted(node.keys()))}")
    node[leaf] = tuple(value) if isinstance(value, list) else value


def plan(suite, seeds=None) -> list[dict]:
  """The runs of a suite: one dict per (method, seed) with its name, slug, seed and config.

  >>> runs = plan(suites.get_config("smoke"))                      # doctest: +SKIP
  >>> [(r["name"], r["seed"]) for r in runs]                        # doctest: +SKIP
  [('CE', 0), ('LPA', 0)]
  """
  from experiments.configs.common import validate
  seeds = tuple(int(s) for s in (seeds if seeds is not None else suite.seeds))
  slugs = [slug(m["name"]) for m in suite.methods]
  if len(set(slugs)) != len(slugs):
    raise ValueError(f"Method names must give distinct directory names, got {slugs}")
  runs = []
  for method, s in zip(suite.methods, slugs):
    for seed in seeds:
      config = copy.deepcopy(task_config(suite.task))
      apply_overrides(config, dict(suite.overrides))
      apply_overrides(config, {k: v for k, v in method.items() if k not in META_KEYS})
      config.seed = seed  # data.seed stays fixed: same subset / noise / split for every run
      runs.append({"name": method["name"], "slug": s, "seed": seed,
                   "point": method.get("point"), "config": validate(config)})
  return runs


def machine() -> dict:
  import jax
  return {"platform": platform.platform(), "processor": platform.processor() or "?",
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def _clean(workdir: str) -> None:
  # Checkpoints are only needed to resume; a finished run keeps results + metrics only.
  for sub in ("checkpoints", "tensorboard"):
    shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)


def run_suite(suite, root: str, seeds=None, progress: bool = True, report: bool = True) -> dict:
  """Runs every unfinished (method, seed) of ``suite`` under ``root``; returns counts
  ``{"ran": n, "skipped": m}``.  Writes the report at the end when ``report``."""
  from lpa_jax import data as lpa_data
  from lpa_jax.train.loop import train_and_evaluate
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    tqdm = None
  runs = plan(suite, seeds)
  os.makedirs(root, exist_ok=True)
  meta = {"suite": suite.name, "description": suite.description, "task": suite.task,
          "overrides": [[k, v] for k, v in suite.overrides],
          "methods": [dict(m) for m in suite.methods],
          "seeds": sorted({r["seed"] for r in runs}), "machine": machine()}
  with open(os.path.join(root, "suite.json"), "w") as f:
    json.dump(meta, f, indent=1, default=list)
  cache, counts = {}, {"ran": 0, "skipped": 0}
  bar = tqdm(total=len(runs), desc=suite.name, disable=not progress or tqdm is None,
             dynamic_ncols=True)
  for r in runs:
    workdir = os.path.join(root, "runs", r["slug"], f"seed{r['seed']}")
    bar.set_postfix_str(f"{r['name']} seed {r['seed']}")
    if os.path.exists(os.path.join(workdir, "results.json")):
      counts["skipped"] += 1
      bar.update(1)
      continue
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "method.json"), "w") as f:
      json.dump({k: r[k] for k in ("name", "slug", "seed", "point")}, f, indent=1)
    # Methods may override data fields; share one load per distinct data config.
    key = r["config"].data.to_json_best_effort(sort_keys=True)
    if key not in cache:
      cache[key] = lpa_data.load_task_data(r["config"].data)
    res = train_and_evaluate(r["config"], workdir, progress=False, data=cache[key])
    _clean(workdir)
    counts["ran"] += 1
    bar.update(1)
    if tqdm is not None:
      tqdm.write(f"{suite.name}: {r['name']} seed {r['seed']}: test acc "
                 f"{100 * res['test_accuracy']:.2f}%  ({res['wall_time_s']:.0f} s)")
  bar.close()
  if report:
    from experiments import report as report_mod
    report_mod.write_report(root)
  return counts


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
  from experiments.configs import suites
  config = FLAGS.config
  names = tuple(config.suites) if "suites" in config else (None,)
  t0 = time.time()
  for name in names:
    suite = suites.get_config(name) if name else config
    if FLAGS.root and name:
      root = os.path.join(FLAGS.root, name)
    else:
      root = FLAGS.root or os.path.join(RESULTS_DIR, suite.name)
    counts = run_suite(suite, root, FLAGS.seeds, FLAGS.progress, FLAGS.report)
    print(f"{suite.name}: ran {counts['ran']}, skipped {counts['skipped']} finished; "
          f"report: {root}/report.md", flush=True)
  print(f"sweep wall time: {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
