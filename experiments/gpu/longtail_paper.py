"""The paper-scale long-tail table on a GPU machine, in resumable chunks.

ResNet-32 on CIFAR-10 (JPEG-75)-LT, IR 100, 200 epochs, the SPEC schedule
(``experiments/configs/longtail.py:paper_cifar10``); CE, LA, LDAM-DRW, LPL, LA+LPL, LPA and
LPA+LPL, seeds 0-2, a method's seeds trained as one program (:mod:`experiments.train.parallel`).
The GPU machines have no TensorFlow, no internet and room for a 64 MiB working tree, so:

1. Here, where the CIFAR-10 (JPEG-75) cache is, once:

     python -m experiments.gpu.longtail_paper export     # .device_data/cifar10_lt100_jpeg75.npz
     pip install --no-deps --target .device_deps ml-collections
     python -m experiments.gpu.run_all --check_carry     # all that travels fits in 64 MiB

2. On the GPU machine, with ``.device_data`` and ``.device_deps`` beside the checkout, one
   chunk per session (``$OUT``: a folder that comes back)::

     PYTHONPATH=.device_deps python3 -m experiments.gpu.longtail_paper train --budget_s=520 \
         --state=.device_data/paper_lt_state.tar.gz --save_state=$OUT/paper_lt_state.tar.gz

   It trains until the budget is spent (stopping at a step boundary with a checkpoint) and
   packs the runs (finished ones without checkpoints) into ``--save_state``.  Copy that file
   back to ``.device_data/`` and run again: finished runs are skipped, the others resume.
3. ``python -m experiments.report --root=<root>`` writes the table from the unpacked runs.

The layout of ``--root`` is a sweep's (``runs/<method>/seed<k>/``, ``suite.json``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tarfile
import threading
import time

DATA_FILE = ".device_data/cifar10_lt100_jpeg75.npz"
TASK = "longtail.py:paper_cifar10"
LIMIT_BYTES = 48 * 2**20  # at most; what else travels is checked by run_all.check_carry
STATE_LIMIT_BYTES = 16 * 2**20  # the largest file a device call brings back
# Config fields that decide which images the portable file holds.
DATA_FIELDS = ("name", "imbalance_ratio", "n_max", "test_subset", "noise_type", "noise_rate",
               "seed")


def methods() -> dict:
  """The table's methods by short name, as sweep method dicts."""
  from experiments.configs import suites
  return {"ce": suites.CE, "la": suites.LA, "ldam_drw": suites.LDAM, "lpl": suites.LPL,
          "la_lpl": {"name": "LA+LPL", "perturb.logit": "logit_adjust,lpl"},
          "lpa": suites.LPA, "lpa_lpl": suites.LPA_LPL}


def paper_suite(names, seeds, overrides=()):
  """The suite of ``names`` × ``seeds`` on the paper task; ``overrides`` shrink it (dry runs)."""
  from experiments.configs import suites
  table = methods()
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; known: {sorted(table)}")
  return suites._suite(  # noqa: SLF001 - the suite factory the committed suites use
      "paper_longtail_cifar10", TASK, [table[n] for n in names], dict(overrides), seeds,
      description="ResNet-32, CIFAR-10 (JPEG-75)-LT IR 100, 200 epochs, SPEC schedule "
      "(experiments/gpu/longtail_paper.py).")


def jpeg_files(data, data_dir: str | None = None) -> dict:
  """``{"x_train": [bytes, ...], "x_test": [...]}``: the CIFAR-10 (JPEG-75) file each image of
  ``data`` was decoded from, found by decoding every file of the offline copy as TFDS does
  (``tf.io.decode_image``) and matching the pixels."""
  import hashlib

  import numpy as np
  import tensorflow as tf

  from experiments.data.sources import CIFAR10_JPEG_TARBALL, resolve_data_dir
  root, how = resolve_data_dir(data_dir)
  tarball = root / CIFAR10_JPEG_TARBALL if root is not None else None
  if tarball is None or not tarball.exists():
    raise FileNotFoundError(f"the jpeg encoding needs the CIFAR-10 (JPEG-75) files, not found "
                            f"at {tarball} (data dir from {how}); export with --encoding=loco")
  key = lambda px: hashlib.sha256(np.ascontiguousarray(px).tobytes()).digest()  # noqa: E731
  files = {"train": {}, "test": {}}
  with tarfile.open(tarball) as tar:
    for m in tar:
      split = m.name.lstrip("./").split("/")[0]
      if m.isfile() and m.name.endswith(".jpg") and split in files:
        blob = tar.extractfile(m).read()
        files[split].setdefault(key(tf.io.decode_image(blob, channels=3).numpy()), blob)
  out = {}
  for name, split, x in (("x_train", "train", data.x_train), ("x_test", "test", data.x_test)):
    found = [files[split].get(key(img)) for img in x]
    missing = [i for i, b in enumerate(found) if b is None]
    if missing:
      raise ValueError(f"{name}: {len(missing)} images match no file of {tarball} (first: "
                       f"{missing[:5]}); export with --encoding=loco")
    out[name] = found
  return out


def export(out: str, encoding: str = "jpeg") -> int:
  """Writes the paper task's data (long-tail training set, full test set) to ``out``: by
  default as the JPEG files the images came from (about a third of the lossless ``loco``
  size; the device needs Pillow to read it), exact either way (:mod:`experiments.data.portable`)."""
  from experiments.configs.longtail import get_config
  from experiments.data import load_task_data
  from experiments.data.portable import ENCODINGS, save_portable
  if encoding not in ENCODINGS:
    raise ValueError(f"--encoding must be one of {ENCODINGS}, got {encoding!r}")
  config = get_config("paper_cifar10")
  data = load_task_data(config.data)
  meta = {"data": {k: config.data.get(k) for k in DATA_FIELDS}}
  jpegs = jpeg_files(data, config.data.get("data_dir")) if encoding == "jpeg" else None
  size = save_portable(data, out, meta=meta, jpegs=jpegs)
  print(f"{out}: {data.name}, {data.num_train} train / {len(data.y_test)} test images, "
        f"{size / 2**20:.1f} MiB ({encoding})", flush=True)
  if size > LIMIT_BYTES:
    raise SystemExit(f"{out} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB "
                     "that leaves room beside it in a 64 MiB working tree")
  from experiments.gpu import run_all
  run_all.check_carry()  # the whole call: the checkout, this file, .device_deps, the state
  return size


def check_data(header: dict, config) -> None:
  """Refuses a portable file made for another data config (another subset of images)."""
  saved = header.get("meta", {}).get("data", {})
  diff = [f"data.{k}: {saved.get(k)!r} in the file, {config.data.get(k)!r} in the config"
          for k in DATA_FIELDS if saved.get(k) != config.data.get(k)]
  if diff:
    raise ValueError("The portable data file was made for another data config:\n  "
                     + "\n  ".join(diff) + "\nExport it again for this config.")


def _older_checkpoints(root: str) -> set[str]:
  """Checkpoint dirs (relative to ``root``) older than their run's newest one."""
  old = set()
  for parent, dirs, _ in os.walk(root):
    if os.path.basename(parent) == "checkpoints":
      steps = sorted((int(d) for d in dirs if d.isdigit()), reverse=True)
      old |= {os.path.relpath(os.path.join(parent, str(s)), root) for s in steps[1:]}
      dirs.clear()
  return old


def pack_state(root: str, path: str) -> int:
  """Tars ``root`` (runs, metrics, each unfinished run's newest checkpoint) into ``path``;
  returns its size.  One checkpoint per run keeps the file under what a call returns."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  old = _older_checkpoints(root)

  def keep(member):
    name = os.path.normpath(member.name)
    return None if any(name == o or name.startswith(o + os.sep) for o in old) else member
  tmp = f"{path}.tmp{os.getpid()}"
  with tarfile.open(tmp, "w:gz") as tar:
    for entry in sorted(os.listdir(root)):
      tar.add(os.path.join(root, entry), arcname=entry, filter=keep)
  os.replace(tmp, path)
  return os.path.getsize(path)


def unpack_state(path: str, root: str) -> None:
  """Unpacks a :func:`pack_state` file into ``root``, replacing what was there."""
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  with tarfile.open(path) as tar:
    tar.extractall(root, filter="data")


class Deadline:
  """Sends this process one SIGINT when the budget is spent: the loop then stops at the next
  step boundary and saves, as on Ctrl-C (:mod:`experiments.train.loop`)."""

  def __init__(self, budget_s: float):
    self.end = time.time() + budget_s
    self._timer = threading.Timer(budget_s, os.kill, (os.getpid(), signal.SIGINT))
    self._timer.daemon = True

  def left(self) -> float:
    return self.end - time.time()

  def __enter__(self):
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()


def _groups(todo: list[dict], k: int) -> list[list[dict]]:
  """Unfinished runs in groups of up to ``k`` seeds of one method."""
  by_method = {}
  for r in todo:
    by_method.setdefault(r["slug"], []).append(r)
  return [rs[i:i + k] for rs in by_method.values() for i in range(0, len(rs), k)]


def _train_group(group, root, data, max_steps):
  from experiments.train.loop import train_and_evaluate
  from experiments.train.parallel import train_and_evaluate_parallel
  dirs = [os.path.join(root, "runs", r["slug"], f"seed{r['seed']}") for r in group]
  if len(group) == 1:
    res = train_and_evaluate(group[0]["config"], dirs[0], progress=False, data=data,
                             max_steps=max_steps)
    finished = res is not None
  else:
    finished = train_and_evaluate_parallel([r["config"] for r in group], dirs, progress=False,
                                           data=data, max_steps=max_steps) is not None
  if finished:  # a finished run keeps results and metrics; its checkpoints only cost space
    for d in dirs:
      for sub in ("checkpoints", "tensorboard"):
        shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
  return finished


def _parse_sets(items) -> dict:
  """``["optim.num_epochs=2", "model.name=mlp"]`` -> overrides; values read as Python literals
  when they parse as one (numbers, tuples, booleans), else as strings."""
  import ast
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set wants key=value, got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _finished_results(runs, root) -> list[dict]:
  from experiments.train.workdir import read_json
  out = []
  for r in runs:
    path = os.path.join(root, "runs", r["slug"], f"seed{r['seed']}", "results.json")
    if os.path.exists(path):
      out.append(read_json(path))
  return out


def train(args) -> int:
  """One chunk: unpack the state, train unfinished runs until the budget, pack the state."""
  import jax
  from experiments import sweep
  from experiments.report import results_table
  from experiments.data.portable import load_portable, read_header
  if args.state and os.path.exists(args.state):
    unpack_state(args.state, args.root)
  runs = sweep.plan(paper_suite(args.methods, args.seeds, _parse_sets(args.set)))
  check_data(read_header(args.data), runs[0]["config"])
  statuses = [sweep.run_status(os.path.join(args.root, "runs", r["slug"], f"seed{r['seed']}"),
                               r["config"]) for r in runs]
  sweep.check_stale(runs, statuses, args.root, "refuse")
  todo = [r for r, (status, _) in zip(runs, statuses) if status not in ("finished", "stopped")]
  os.makedirs(args.root, exist_ok=True)
  sweep.write_meta(paper_suite(args.methods, args.seeds), runs, args.root)
  print(f"longtail_paper: {jax.device_count()} device(s) {jax.devices()}; "
        f"{len(runs) - len(todo)} of {len(runs)} runs finished", flush=True)
  data = load_portable(args.data)
  try:
    with Deadline(args.budget_s) as deadline:
      for group in _groups(todo, args.parallel):
        if deadline.left() < args.min_group_s:
          print(f"budget: {deadline.left():.0f} s left, too little to start "
                f"{group[0]['name']}", flush=True)
          break
        t0 = time.time()
        try:
          done = _train_group(group, args.root, data, args.max_steps)
        except sweep.guard_errors() as e:  # this method stops; the others go on
          dirs = [os.path.join(args.root, "runs", r["slug"], f"seed{r['seed']}") for r in group]
          sweep.record_stopped([(r, d, None) for r, d in zip(group, dirs)], e)
          print(f"{group[0]['name']} seeds {[r['seed'] for r in group]}: STOPPED "
                f"({time.time() - t0:.0f} s): {str(e)[:400]}", flush=True)
          continue
        print(f"{group[0]['name']} seeds {[r['seed'] for r in group]}: "
              f"{'finished' if done else 'stopped after --max_steps'} "
              f"({time.time() - t0:.0f} s)", flush=True)
        if not done:
          break
  except KeyboardInterrupt as e:  # the deadline's SIGINT; the loop saved where it stopped
    print(f"budget spent: {e or 'stopped before a step boundary'}", flush=True)
  finished = _finished_results(runs, args.root)
  if finished:
    print(results_table(finished), flush=True)
  print(f"{len(finished)} of {len(runs)} runs finished"
        + ("" if len(finished) == len(runs) else "; call again to continue"), flush=True)
  if args.save_state:
    size = pack_state(args.root, args.save_state)
    print(f"state: {args.save_state} ({size / 2**20:.1f} MiB)", flush=True)
    if size > STATE_LIMIT_BYTES:
      print(f"warning: over the {STATE_LIMIT_BYTES >> 20} MiB a device call returns per file; "
            "use a smaller --parallel", flush=True)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="write the paper task's data as one portable file")
  ex.add_argument("--out", default=DATA_FILE)
  ex.add_argument("--encoding", default="jpeg", choices=("jpeg", "loco"),
                  help="jpeg: the source JPEG files plus a residual (small; needs Pillow "
                       "there); loco: lossless pixels (any data, ~2.5x larger)")
  tr = sub.add_parser("train", help="train one chunk of the table")
  tr.add_argument("--data", default=DATA_FILE)
  tr.add_argument("--root", default="/tmp/paper_longtail_cifar10",
                  help="where the runs live during the call (a sweep root)")
  tr.add_argument("--state", help="a packed root to continue from, if it exists")
  tr.add_argument("--save_state", help="where to pack the root at the end")
  tr.add_argument("--methods", type=lambda s: s.split(","), default=list(methods()))
  tr.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
  tr.add_argument("--parallel", type=int, default=3, help="seeds of a method per program")
  tr.add_argument("--budget_s", type=float, default=520.0,
                  help="stop (with checkpoints) after this many seconds")
  tr.add_argument("--min_group_s", type=float, default=60.0,
                  help="start no group with less time left (its compile alone takes ~30 s)")
  tr.add_argument("--max_steps", type=int, default=None, help="per group, for dry runs")
  tr.add_argument("--set", action="append", help="config override key=value (dry runs)")
  args = parser.parse_args(argv)
  if args.command == "export":
    export(args.out, args.encoding)
    return 0
  return train(args)


if __name__ == "__main__":
  sys.exit(main())
