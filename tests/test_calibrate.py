"""Radius calibration (SPEC §1 "Radius scale"): the calibrate command, and every committed
config that uses LPA measurably perturbs at initialisation (mean |loss change| of signed
classes >= INIT_THRESHOLD = 0.01 nats; SPEC §1's 0.05 applies over training and is checked by
the trainer, tests/test_strength.py).

The per-config check runs each config's own LPA block and point, built by the registry as a
run builds it, on two real training batches of 32 at initialisation.  Each check compiles
its network, so the default run keeps two of them — the small CNN on Fashion-MNIST-LT and
ResNet-32 on CIFAR-10 (JPEG-75)-LT — and the rest are marked slow (``pytest -m slow``).
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from experiments import calibrate_check as cc
from experiments.calibrate_measure import INIT_THRESHOLD as THRESHOLD

DEFAULT_RUN = ("longtail.py:quick", "longtail.py:paper_cifar10")
GROUPS = cc.distinct(cc.lpa_configs())


def _params():
  for labels, config in GROUPS:
    marks = () if set(DEFAULT_RUN) & set(labels) else (pytest.mark.slow,)
    yield pytest.param(labels, config, id=labels[0], marks=marks)


@pytest.mark.parametrize("labels,config", list(_params()))
def test_every_lpa_config_measurably_perturbs(labels, config):
  try:
    s = cc.check(config)
  except FileNotFoundError as e:  # CIFAR-100 has no offline copy on every machine
    pytest.skip(f"{labels[0]}: {str(e).splitlines()[0]}")
  assert s["signed_classes"] > 0, f"{labels}: no class has a sign, LPA would do nothing"
  lpa = config.perturb.lpa
  need, why = cc.required(labels)  # THRESHOLD, or a lower bound stated with its reason
  assert s["mean_abs_signed"] >= need, (
      f"{labels}: LPA at {s['point']} ({lpa.radius_mode} ε={lpa.eps}) moves the loss by "
      f"{s['mean_abs_signed']:.4f} nats on average over signed classes, below {need} ({why})")


def test_only_named_configs_are_conservative_and_each_says_why():
  labels = {label for group, _ in GROUPS for label in group}
  assert set(cc.CONSERVATIVE) <= labels, "a conservative entry names no config"
  for label, (need, why) in cc.CONSERVATIVE.items():
    assert 0 < need < THRESHOLD and "issue" in why, label
  assert cc.required(["longtail.py:quick", "balanced.py:quick"])[0] == THRESHOLD


ADV_GROUPS = cc.distinct(cc.lpa_configs("adversarial"))


@pytest.mark.parametrize("labels,config", [
    pytest.param(labels, config, id=labels[0],
                 marks=() if "longtail.py:quick" in labels else (pytest.mark.slow,))
    for labels, config in ADV_GROUPS])
def test_every_adversarial_config_measurably_perturbs(labels, config):
  try:
    s = cc.check(config)
  except FileNotFoundError as e:
    pytest.skip(f"{labels[0]}: {str(e).splitlines()[0]}")
  assert s["mean_abs_signed"] >= THRESHOLD, (labels, config.perturb.adversarial.eps, s)


def test_the_check_fails_on_the_spec_absolute_radius():
  # The SPEC's absolute ε = 0.1 is inert on these networks: the check above must catch it.
  labels, config = next(g for g in GROUPS if "longtail.py:quick" in g[0])
  config = cc.shrink(config)
  config.perturb.lpa.update(dict(radius_mode="absolute", eps=0.1))
  assert cc.check(config)["mean_abs_signed"] < THRESHOLD


def test_longtail_lpl_default_perturbs_without_collapsing():
  # α·K of the long-tail default: a loss change above the floor, and a head-vs-tail logit
  # offset within twice the log-prior ratio at the split (α 0.15 gave 5x and collapsed the
  # last head classes; experiments/results/calibrate/README.md).
  from experiments import calibrate_measure as cm
  config = cc.shrink(next(c for labels, c in GROUPS if "longtail.py:quick" in labels))
  setup = cm.prepare(config, cc.load_data(config), batches=2)
  pc = cm.measure_lpl(setup, config.perturb.lpl.alpha)
  off = cm.lpl_offsets(pc, setup.ctx.class_counts)
  assert cm.summarize(pc)["mean_abs_signed"] >= THRESHOLD
  assert 0 < off["head_tail_offset"] <= 2 * off["boundary_log_prior_ratio"], off
  old = cm.lpl_offsets(cm.measure_lpl(setup, 0.15), setup.ctx.class_counts)
  assert old["head_tail_offset"] > 2 * old["boundary_log_prior_ratio"], old


def test_every_task_variant_and_suite_lpa_method_is_enumerated():
  labels = {label for group, _ in GROUPS for label in group}
  # The variants each get_config's error message offers, and a suite method of each kind.
  for name, variants in {"longtail": ["quick", "quick_cifar10", "paper_cifar10",
                                      "paper_cifar100"],
                         "noisy": ["quick", "quick_asym", "paper_cifar10", "paper_cifar10_asym"],
                         "domain": ["quick", "paper", "colored_quick"]}.items():
    assert set(cc.task_variants(name)) == set(variants)
  assert len(cc.task_variants("balanced")) == 6
  assert {"suites.py:smoke/LPA", "suites.py:longtail_cifar10/LPA+LPL",
          "suites.py:ablation_fmnist/LPA @ features"} <= labels
  assert not {"suites.py:longtail_fmnist/LPL", "suites.py:longtail_fmnist/CE"} & labels


def _finite(obj):
  if isinstance(obj, dict):
    return all(_finite(v) for v in obj.values())
  if isinstance(obj, list):
    return all(_finite(v) for v in obj)
  return not isinstance(obj, float) or math.isfinite(obj)


@pytest.mark.slow  # default-suite time on 2 cores; run with -m slow
def test_calibrate_command_writes_its_report(tmp_path):
  out = tmp_path / "cal.json"
  cmd = [sys.executable, "-m", "experiments.calibrate",
         "--config=experiments/configs/longtail.py:quick", "--config.data.n_max=100",
         "--config.model.kwargs.widths=(4,8,8)", "--small", "--train-steps=2",
         "--methods=lpa,lpl", "--noprogress", f"--out={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "lpa relative" in proc.stdout and "lpl α=" in proc.stdout
  report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
  assert _finite(report)
  assert report["data"]["name"].startswith("Fashion-MNIST-LT")
  assert report["machine"]["cpu_count"] and report["config"]["perturb"]["activation"] == "lpa"
  assert [r["train_steps"] for r in report["runs"]] == [2]  # after plain training steps
  for run in report["runs"]:
    (point, entry), = run["points"].items()
    assert point == "stage2"  # the small CNN's default point
    norms = np.asarray(entry["act_norm_C"])
    assert norms.shape == (10,) and norms.max() > 0
    for mode in ("absolute", "relative"):
      rows = [r for r in entry["lpa"] if r["radius_mode"] == mode]
      assert [r["eps"] for r in rows] == sorted(r["eps"] for r in rows) and len(rows) == 2
      # A larger radius moves the loss more, and expansive classes gain loss.
      assert rows[0]["mean_abs_signed"] < rows[1]["mean_abs_signed"]
      assert rows[1]["mean_change_P"] > 0 > rows[1]["mean_change_N"]
    alphas = run["lpl"]
    assert alphas[0]["mean_abs_signed"] < alphas[1]["mean_abs_signed"]
    assert alphas[0]["head_tail_offset"] < alphas[1]["head_tail_offset"]
