"""Radius calibration (SPEC §1 "Radius scale"): how much does each radius move the loss?

  python -m experiments.calibrate --config=experiments/configs/longtail.py:paper_cifar10 \\
      --points=stage2,stage3.block1,stage3.block3,stage3 --batches=4 --train-steps=0,50 \\
      --out=experiments/results/calibrate/resnet32_cifar10_lt.json

For each point, per class: the mean activation norm ‖a‖ and the loss change (perturbed minus
clean cross-entropy, nats) that LPA causes over a grid of radii, absolute (``ε`` in the
activation's units) and relative (``ε`` a fraction of the class's mean ‖a‖), each times
``β^(L−l)``; the same for the adversarial feature baseline (absolute radius), LPL's step ``α``
at the configured ``K`` (logit level), and the config's own methods as a run builds them
(``--config.perturb.activation=lpa`` is implied when the config selects none).  Model at
initialisation and after each ``--train-steps`` count of plain training (the first epoch),
on real training batches of the config's data.  Writes JSON (machine, config, data) and prints
a table.  ``--small``: two batches of 32, a short grid, the configured point only (CPU, tests).
A config "measurably perturbs" when the mean |loss change| of its signed classes is ≥ 0.05.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/longtail.py:paper_cifar10",
                                "Config file and variant, e.g. longtail.py:paper_cifar10.")
flags.DEFINE_string("out", None, "Where to write the JSON report.")
flags.DEFINE_list("points", None, "Points to measure (default: the config's LPA point).")
GRIDS = {"absolute": (0.01, 0.1, 0.3, 1.0, 3.0, 10.0), "relative": (0.01, 0.03, 0.1, 0.3, 0.5, 1.0),
         "adversarial": (0.1, 1.0, 3.0, 10.0), "lpl": (0.0025, 0.005, 0.01, 0.025, 0.05, 0.15)}
_str = lambda k: [f"{v:g}" for v in GRIDS[k]]  # noqa: E731
flags.DEFINE_list("abs_radii", _str("absolute"), "Absolute LPA ε grid.")
flags.DEFINE_list("rel_radii", _str("relative"),
                  "Relative LPA ε grid (fractions of the class's mean ‖a‖).")
flags.DEFINE_list("adv_radii", _str("adversarial"), "Adversarial-feature ε grid (absolute).")
flags.DEFINE_list("lpl_alphas", _str("lpl"), "LPL step α grid (at the configured K).")
flags.DEFINE_list("methods", ["lpa", "adversarial", "lpl", "configured"], "What to measure.")
flags.DEFINE_integer("batches", 4, "Training batches per measurement.")
flags.DEFINE_list("train_steps", ["0"], "Plain training steps before measuring (each a row).")
flags.DEFINE_bool("small", False, "CPU-fast mode: 2 batches of 32, short grids, one point.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

SMALL = dict(batches=2, batch_size=32, grids={"absolute": (0.1, 1.0), "relative": (0.1, 0.5),
                                              "adversarial": (1.0,), "lpl": (0.01, 0.15)})


def with_lpa(config):
  """``config`` with LPA switched on when it selects no activation method (its own LPA block
  unchanged); another selected method (adversarial, ...) is what ``configured`` measures."""
  if config.perturb.activation == "none":
    config.perturb.activation = "lpa"
  return config


def machine() -> dict:
  import jax
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()[:1]]}


def _floats(values):
  return tuple(float(v) for v in values)


def _tolist(d: dict) -> dict:
  return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in d.items()}


def measure_setup(setup, points, grids, methods, bar) -> dict:
  """Every measurement of one model state (one ``train_steps`` value)."""
  from experiments import calibrate_measure as cm
  out = {"train_steps": setup.train_steps, "points": {}}
  for point in points:
    norm_C, acts = cm.activation_norms(setup, point)
    entry = {"act_norm_C": norm_C.tolist(), "depth": setup.ctx.depth(point),
             "lpa": [], "adversarial": []}
    if "lpa" in methods:
      for mode in ("absolute", "relative"):
        for eps in grids[mode]:
          pc = cm.measure_lpa(setup, point, eps, mode, acts)
          entry["lpa"].append({"radius_mode": mode, "eps": eps, **cm.summarize(pc),
                               "per_class": _tolist(pc)})
          bar.update(1)
    if "adversarial" in methods:
      for eps in grids["adversarial"]:
        pc = cm.measure_adversarial(setup, point, eps, acts)
        entry["adversarial"].append({"eps": eps, **cm.summarize(pc), "per_class": _tolist(pc)})
        bar.update(1)
    out["points"][point] = entry
  if "lpl" in methods:
    out["lpl"] = []
    for alpha in grids["lpl"]:
      pc = cm.measure_lpl(setup, alpha)
      out["lpl"].append({"alpha": alpha, "steps": setup.config.perturb.lpl.steps,
                         **cm.summarize(pc), **cm.lpl_offsets(pc, setup.ctx.class_counts),
                         "per_class": _tolist(pc)})
      bar.update(1)
  if "configured" in methods:
    pc = cm.measure_configured(setup)
    out["configured"] = {**cm.summarize(pc), "per_class": _tolist(pc)}
    bar.update(1)
  return out


def calibrate(config, data, points=None, grids=None, methods=("lpa", "adversarial", "lpl",
              "configured"), batches: int = 4, train_steps=(0,), progress: bool = False) -> dict:
  """The calibration report of ``config`` (LPA switched on) on ``data`` as a JSON-able dict.

  Not run as a doctest: it needs the data and trains.

  >>> report = calibrate(config, data, ["stage3"], batches=2)      # doctest: +SKIP
  >>> report["runs"][0]["points"]["stage3"]["lpa"][0]["mean_abs_signed"]   # doctest: +SKIP
  0.21
  """
  from experiments import calibrate_measure as cm
  from experiments.registry import resolve_point
  config = with_lpa(config)
  grids = grids or GRIDS
  n_point = (len(grids["absolute"]) + len(grids["relative"])) * ("lpa" in methods) \
      + len(grids["adversarial"]) * ("adversarial" in methods)
  total = len(train_steps) * ((len(points) if points else 1) * n_point
                              + len(grids["lpl"]) * ("lpl" in methods) + ("configured" in methods))
  bar = _bar(total, progress)
  runs, t0 = [], time.time()
  for k in train_steps:
    setup = cm.prepare(config, data, batches, k)
    pts = list(points or [resolve_point(config.perturb.lpa.point, setup.ctx)])
    runs.append(measure_setup(setup, pts, grids, methods, bar))
  bar.close()
  return {"command": " ".join(["python -m experiments.calibrate"] + sys.argv[1:]),
          "machine": machine(), "wall_s": time.time() - t0,
          "threshold_nats": cm.THRESHOLD, "config": config.to_dict(),
          "data": {"name": data.name, "num_train": int(data.num_train),
                   "class_counts": [int(c) for c in data.class_counts()],
                   "batches": batches, "batch_size": int(config.optim.batch_size),
                   "augment": config.train.augment},
          "grids": {k: list(v) for k, v in grids.items()}, "runs": runs}


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def _bar(total, progress):
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - progress bars are optional
    return _NoBar()
  return tqdm(total=total, desc="calibrate", disable=not progress) if progress else _NoBar()


def _fmt(v):
  return "   -  " if v is None else f"{v:+.3f}"


def table(report: dict) -> str:
  """A small text table: mean |loss change| of signed classes per point, method and radius."""
  lines = []
  for run in report["runs"]:
    lines.append(f"== after {run['train_steps']} plain training steps "
                 f"(mean |Δloss| of signed classes, nats; P / N: mean Δloss of each set)")
    for point, e in run["points"].items():
      norm = [v for v in e["act_norm_C"] if v > 0]
      lines.append(f"{point}: depth {e['depth']}, mean ‖a‖ {sum(norm) / max(len(norm), 1):.2f}")
      for r in e["lpa"]:
        lines.append(f"  lpa {r['radius_mode']:8s} ε={r['eps']:<7g} "
                     f"|Δ| {r['mean_abs_signed']:.3f}  P {_fmt(r['mean_change_P'])}  "
                     f"N {_fmt(r['mean_change_N'])}")
      for r in e["adversarial"]:
        lines.append(f"  adversarial       ε={r['eps']:<7g} |Δ| {r['mean_abs_signed']:.3f}")
    for r in run.get("lpl", []):
      lines.append(f"lpl α={r['alpha']:<7g} K={r['steps']}  |Δ| {r['mean_abs_signed']:.3f}  "
                   f"P {_fmt(r['mean_change_P'])}  N {_fmt(r['mean_change_N'])}  head-tail "
                   f"offset {_fmt(r['head_tail_offset'])} (log-prior ratio at the split "
                   f"{_fmt(r['boundary_log_prior_ratio'])})")
    if "configured" in run:
      c = run["configured"]
      lines.append(f"configured: |Δ| {c['mean_abs_signed']:.3f} over {c['signed_classes']} "
                   f"signed classes ({'perturbs' if c['mean_abs_signed'] >= 0.05 else 'INERT'})")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from experiments.configs.common import validate
  from experiments.data import load_task_data
  config = FLAGS.config
  grids = {"absolute": _floats(FLAGS.abs_radii), "relative": _floats(FLAGS.rel_radii),
           "adversarial": _floats(FLAGS.adv_radii), "lpl": _floats(FLAGS.lpl_alphas)}
  batches = FLAGS.batches
  if FLAGS.small:
    config.optim.batch_size = min(config.optim.batch_size, SMALL["batch_size"])
    grids = SMALL["grids"]
    batches = SMALL["batches"]
  config = validate(with_lpa(config))
  data = load_task_data(config.data)
  report = calibrate(config, data, FLAGS.points, grids, tuple(FLAGS.methods), batches,
                     tuple(int(k) for k in FLAGS.train_steps), FLAGS.progress)
  print(table(report))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(report, f, indent=1)
    print(f"calibration: {FLAGS.out}")
  return 0


def _underscored(arg: str) -> str:
  """``--train-steps=5`` -> ``--train_steps=5`` (``--config.*`` overrides are left alone)."""
  if not arg.startswith("--") or arg.startswith("--config"):
    return arg
  name, eq, value = arg[2:].partition("=")
  return "--" + name.replace("-", "_") + eq + value


if __name__ == "__main__":
  app.run(main, argv=[_underscored(a) for a in sys.argv])
