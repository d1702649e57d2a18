"""Does every committed config that uses LPA measurably perturb?  (SPEC §1 "Radius scale")

Every variant of every task config (with ``perturb.activation=lpa`` switched on, its own LPA
block unchanged) and every LPA method of the experiment suites (suite and method overrides
applied, as the sweep runs them), measured in a small mode: the config's LPA settings and
point, two batches of 32, a smaller data subset, WRN at widen 1 (same points).

  python -m experiments.calibrate_check            # all of them, a table; slow on a CPU
  python -m experiments.calibrate_check longtail.py:quick suites.py:smoke/LPA
  python -m experiments.calibrate_check --adversarial    # the adversarial feature baseline

>>> label, config = lpa_configs()[0]; label
'balanced.py:quick'
>>> check(config)["mean_abs_signed"] >= 0.05   # trains on the data: not run  # doctest: +SKIP
True
"""
from __future__ import annotations

import copy
import importlib
import re
import sys

TASK_FILES = ("balanced", "domain", "longtail", "noisy")
SMALL_N = 200        # per-class (long tail: head) cap, per domain for domain generalisation
BATCH = 32
_data_cache: dict = {}
# Configs whose LPA radius is small by choice, with the loss change they must still reach at
# initialisation (nats) and why.  Everything else must reach calibrate_measure.INIT_THRESHOLD.
CONSERVATIVE = {
    "longtail.py:quick": (0.005, "issue 31: the guarded validation pick, relative ε 0.005 "
                          "(longtail.QUICK_LPA_GUARDED): every setting tried that perturbs "
                          "more unlearned a head class on validation"),
}


def required(labels) -> tuple[float, str]:
  """The loss change at initialisation a group of configs (``labels``) must reach, and why:
  :data:`CONSERVATIVE`'s when every label is listed there, else ``INIT_THRESHOLD``.

  >>> required(["longtail.py:quick"])[0], required(["balanced.py:quick"])[0]
  (0.005, 0.01)
  """
  from experiments.calibrate_measure import INIT_THRESHOLD
  if labels and all(label in CONSERVATIVE for label in labels):
    return min(CONSERVATIVE[label][0] for label in labels), "; ".join(
        dict.fromkeys(CONSERVATIVE[label][1] for label in labels))
  return INIT_THRESHOLD, "SPEC §1's floor, a fifth of it at initialisation"


def task_variants(name: str) -> list[str]:
  """The variants a task config's docstring lists under ``Variants:`` (its documented set)."""
  doc = importlib.import_module(f"experiments.configs.{name}").__doc__
  block = doc.split("Variants:")[1]
  out = []
  for line in block.splitlines()[1:]:
    if not line.startswith("  "):
      break  # a blank or unindented line ends the list
    if line.startswith("   "):
      continue  # a description's continuation
    head = re.split(r"\s{2,}", line.strip())[0]
    out += [v.strip() for v in head.split(",")]
  return out


def lpa_configs(method: str = "lpa") -> list[tuple[str, object]]:
  """``[(label, config)]``: each task variant with ``method`` (LPA) on, then each suite
  method using it."""
  from experiments import sweep
  from experiments.configs import suites
  from experiments.configs.common import validate
  out = []
  for name in TASK_FILES:
    module = importlib.import_module(f"experiments.configs.{name}")
    for variant in task_variants(name):
      c = module.get_config(variant)
      c.perturb.activation = method
      out.append((f"{name}.py:{variant}", validate(c)))
  for suite_name in ("smoke",) + suites.SUITES:
    suite = suites.get_config(suite_name)
    for run in sweep.plan(suite, seeds=(0,)):
      if run["config"].perturb.activation == method:
        out.append((f"suites.py:{suite_name}/{run['name']}", run["config"]))
  return out


def shrink(config):
  """The small mode: fewer images, batch 32, WRN at widen 1; LPA's own settings untouched."""
  c = copy.deepcopy(config)
  c.data.n_max = min(c.data.n_max or SMALL_N, SMALL_N)
  c.data.test_subset = 100
  c.optim.batch_size = BATCH
  if c.model.name.startswith("wrn"):
    c.model.kwargs.widen = 1  # WideResNet(depth, widen): the points depend on depth only
  return c


def load_data(config):
  """The config's data, loaded once per distinct ``config.data``."""
  from experiments.data import load_task_data
  key = repr(sorted(config.data.to_dict().items()))
  if key not in _data_cache:
    _data_cache[key] = load_task_data(config.data)
  return _data_cache[key]


def distinct(configs) -> list[tuple[list[str], object]]:
  """Groups ``[(label, config)]`` whose small-mode measurement is the same (suite methods
  that differ only in name or in fields the measurement never reads: schedule, epochs)."""
  from lpa_jax.models import get_model
  from experiments import registry
  groups: dict = {}
  for label, config in configs:
    c = shrink(config)
    d = c.to_dict()
    used = {n: dict(d["perturb"][n]) for _, n in registry.selected(c.perturb)}
    points = get_model(c.model.name, 2, **d["model"]["kwargs"]).points
    for block in used.values():
      if block.get("point") in ("auto", "default", None) and "point" in block:
        block["point"] = registry.default_point(points)
    key = repr((d["data"], d["model"], d["seed"], d["optim"]["batch_size"],
                d["train"]["augment"], c.perturb.activation, c.perturb.logit, sorted(used.items())))
    groups.setdefault(key, ([], config))[0].append(label)
  return list(groups.values())


def check(config, batches: int = 2, train_steps: int = 0, small: bool = True,
          norms: bool = False) -> dict:
  """The config's own activation method, built as a run builds it: mean |loss change| of
  its signed classes (and per-class numbers) on ``batches`` training batches; ``norms`` adds
  the mean activation norm at the point."""
  from experiments import calibrate_measure as cm
  from experiments.registry import resolve_point
  c = shrink(config) if small else config
  setup = cm.prepare(c, load_data(c), batches, train_steps)
  pc = cm.measure_configured(setup)
  point = resolve_point(c.perturb[c.perturb.activation].point, setup.ctx)
  out = {**cm.summarize(pc), "point": point,
         "per_class": {k: v.tolist() for k, v in pc.items()}}
  if norms:
    norm_C = cm.activation_norms(setup, point)[0]
    out["act_norm"] = float(norm_C[norm_C > 0].mean())
  return out


def main(argv) -> int:
  """``[--adversarial] [--skip=label ...] [label ...]``: a table of the checks (all configs
  when no label is given)."""
  method = "adversarial" if "--adversarial" in argv else "lpa"
  wanted = {a for a in argv if not a.startswith("--")}
  skip = {a[len("--skip="):] for a in argv if a.startswith("--skip=")}
  rows = [(label, c) for label, c in lpa_configs(method)
          if (not wanted or label in wanted) and label not in skip]
  print(f"{'config':52s} {'point':14s} {'‖a‖':>7s} radius        |Δloss| signed")
  for labels, c in distinct(rows):
    try:
      s = check(c, norms=True)
    except FileNotFoundError as e:  # e.g. CIFAR-100 without an offline copy
      print(f"{', '.join(labels):52s} (no data: {str(e).splitlines()[0]})", flush=True)
      continue
    b = c.perturb[method]
    mode = b.get("radius_mode", "absolute")[:3]
    need, why = required(labels)
    for label in labels:
      note = f"  (conservative: {why})" if label in CONSERVATIVE else ""
      flag = "" if s["mean_abs_signed"] >= need else f"  BELOW {need:g}"
      print(f"{label:52s} {s['point']:14s} {s['act_norm']:7.2f} {mode} ε={b.eps:<6g} "
            f"{s['mean_abs_signed']:.3f} {s['signed_classes']:3d}{flag}{note}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
