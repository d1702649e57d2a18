"""Experiment suites: one task config × named methods × seeds, run by the sweep runner.

Run one suite, or several (comma list, or ``all``):
  python -m experiments.sweep --config=experiments/configs/suites.py:longtail_fmnist
  python -m experiments.sweep --config=experiments/configs/suites.py:all
  python -m experiments.sweep --config=experiments/configs/suites.py:smoke --root=/tmp/smoke
Each suite writes ``experiments/results/<suite>/`` (``runs/<method>/seed<k>/``, ``report.md``,
``results.csv``, figures); rerunning skips finished runs and resumes interrupted ones.

Budget (measured one or two runs per suite on this shared 2-core CPU, load ~5-7 from other
jobs; seconds per run incl. compile): the quick suites are shrunk versions of the task configs
(fewer images, narrow CNNs, 5-6 epochs) so that ``all`` — 135 runs — takes about 75 minutes:
longtail_fmnist 33 runs x ~25 s ≈ 14 min, longtail_cifar10 33 x ~42 s ≈ 23 min,
balanced_cifar10 21 x ~33 s ≈ 12 min, domain_rmnist 12 x ~45 s ≈ 9 min, noisy_fmnist
15 x ~30 s ≈ 8 min, ablation_fmnist 21 x ~25 s ≈ 9 min (plus under a minute of data loading
each).  The numbers are small-scale evidence, not the paper's scale.

Seeds: ``seed`` k sets ``config.seed`` (initialisation, batch order, perturbation RNG);
``config.data.seed`` stays fixed, so every method and seed sees the same long-tail subset,
label noise and domain split — differences between methods are then not subset luck, and the
std over seeds measures training randomness only.

A method is a dict: ``name`` plus ``--config.*``-style overrides (dotted keys), e.g.
``{"name": "LPA+LPL", "perturb.activation": "lpa", "perturb.logit": "lpl"}``; an optional
``point`` key marks it as part of a perturbation-point sweep (the report plots accuracy vs
point for those).
"""
from __future__ import annotations

import ml_collections as mlc

SUITES = ("longtail_fmnist", "longtail_cifar10", "balanced_cifar10", "domain_rmnist",
          "noisy_fmnist", "ablation_fmnist")
SEEDS = (0, 1, 2)

# Method building blocks (overrides only; the defaults live in experiments/configs/methods.py).
CE = {"name": "CE"}
LA = {"name": "Logit adj.", "perturb.logit": "logit_adjust"}
LDAM = {"name": "LDAM-DRW", "perturb.logit": "ldam"}
LPL = {"name": "LPL", "perturb.logit": "lpl"}
DROPOUT = {"name": "Dropout", "perturb.activation": "dropout"}
MIXUP = {"name": "Manifold Mixup", "perturb.activation": "manifold_mixup"}
ADV = {"name": "Adv. feature", "perturb.activation": "adversarial"}
LPA = {"name": "LPA", "perturb.activation": "lpa"}
LPA_FIXED = {"name": "LPA fixed", "perturb.activation": "lpa", "perturb.lpa.varied": False}
LPA_VARIED = {"name": "LPA varied", "perturb.activation": "lpa", "perturb.lpa.varied": True}
LPA_LPL = {"name": "LPA+LPL", "perturb.activation": "lpa", "perturb.logit": "lpl"}
LPG = {"name": "LPG", "perturb.gradient": "lpg"}
SAM = {"name": "SAM", "perturb.gradient": "sam"}
GAF = {"name": "GAF", "perturb.gradient": "gaf"}
CLIP = {"name": "Grad. clipping", "perturb.gradient": "clip"}

LONGTAIL_METHODS = (CE, LA, LDAM, LPL, DROPOUT, MIXUP, ADV, LPA_FIXED, LPA_VARIED, LPA_LPL, LPG)
# The small CNN's points, shallow to deep ("logits" = LPA as a class-level logit perturbation).
POINTS = ("stage1", "stage2", "stage3", "features")


def _named(method: dict, name: str) -> dict:
  return {**method, "name": name}


def _suite(name, task, methods, overrides, seeds=SEEDS, description=""):
  c = mlc.ConfigDict()
  c.name = name
  c.description = description
  c.task = task  # "<file in experiments/configs>:<variant>"
  # Dotted keys are not ConfigDict fields, so overrides are (key, value) pairs and methods
  # plain dicts in a list; both apply on top of the task config, methods last.
  c.overrides = tuple(overrides.items())  # every method: shrinks the task for the CPU budget
  c.methods = [dict(m) for m in methods]
  c.seeds = tuple(seeds)
  return c


def _radii(adv_eps: float) -> dict:
  """The adversarial baseline's radius on the suites' CNNs (ours, measured).

  LPA's radius is relative to the class's mean activation norm (:data:`NARROW_LPA` on these
  narrow CNNs; the SPEC's absolute ε = 0.1 moved the loss by ~0.005 here).  The
  per-sample adversarial baseline is absolute only, so it gets ``adv_eps`` ≈ 0.1·‖a‖ at the
  default point (‖a‖ ≈ 29-30 for the 8-16-32 CNN on Fashion-MNIST, ≈ 43 for 16-32-64 on
  Rotated MNIST, at initialisation): both radii are then β^(L−l)·0.1·‖a‖ for an average class.
  ``python -m experiments.calibrate_check`` measures what each suite's LPA does.
  """
  return {"perturb.adversarial.eps": adv_eps}


# LPA's relative radius on the quick suites' narrower CNNs (8-16-32 here, 4-8-8 in ``smoke``):
# the tuned 0.01 (longtail.QUICK_TUNED, chosen on the 16-32-64 CNN) moves their loss by only
# 0.0087-0.0092 nats at initialisation, below the check's 0.01 (tests/test_calibrate.py,
# measured on a 2-core Intel Xeon); 0.015 moves it by 0.013-0.014 nats there.
NARROW_LPA = {"perturb.lpa.eps": 0.015, "perturb.lpa.delta_eps": 0.015}


def _small_fmnist(epochs):
  # 8-16-32 CNN: ~4x fewer FLOPs than the task's 16-32-64 and still far above chance.
  return {"model.kwargs.widths": (8, 16, 32), "optim.num_epochs": epochs,
          "data.test_subset": 2000, "train.checkpoint_every": 2, **_radii(3.0), **NARROW_LPA}


def _small_cifar(n_max):
  # 16-32-64 CNN, 6 epochs on a per-class cap of ``n_max``: the CIFAR-10 (JPEG-75) suites.
  return {"model.kwargs.widths": (16, 32, 64), "optim.num_epochs": 6, "data.n_max": n_max,
          "data.test_subset": 1000, "train.checkpoint_every": 2, **_radii(4.0)}


# --- The converged Fashion-MNIST-LT evidence (full IR-100 long tail, the quick config's CNN).
# Tuning runs train on 90% of the 14,886 training images and select on the stratified 10%
# validation split (data.seed fixed: one split for every run); the full test set is reported
# but never used to choose.
FMNIST_LT_VAL = {"data.val_fraction": 0.1, "train.checkpoint_every": 5}
TUNE_EPOCHS = 30  # CE's training loss plateaus here (suite fmnist_lt_schedule shows the curve)


def _grid(base: dict, label: str, field: str, values) -> tuple[dict, ...]:
  return tuple({**base, "name": f"{label} {field.rsplit('.', 1)[-1]}={v:g}", field: v}
               for v in values)


def _lpa_radius(eps):
  return {"perturb.lpa.eps": eps, "perturb.lpa.delta_eps": eps}


def _lpa_grid(base: dict, label: str, values) -> tuple[dict, ...]:
  """``base`` at each relative or absolute radius ε = Δε of ``values``, named ``label eps=ε``."""
  return tuple({**base, "name": f"{label} eps={e:g}", **_lpa_radius(e)} for e in values)


def fmnist_lt_schedule():
  """CE at 15, 30 and 60 epochs (cosine): where its training loss and validation accuracy
  stop improving, the schedule every converged run uses."""
  methods = tuple({"name": f"CE {e} epochs", "optim.num_epochs": e} for e in (15, 30, 60))
  return _suite("fmnist_lt_schedule", "longtail.py:quick", methods, seeds=(0,),
                overrides=FMNIST_LT_VAL, description=(
                    "Fashion-MNIST-LT IR 100, CNN 16-32-64, 90% of the training set (10% "
                    "stratified validation), full test set; CE for 15 / 30 / 60 epochs."))


def fmnist_lt_tune():
  """One knob per method, 4 values each (LPA: radius and point), 1 seed, selected on
  validation at the converged schedule."""
  lpa = _lpa_grid(LPA, "LPA", (0.002, 0.005, 0.01, 0.02))
  lpa_points = tuple({**LPA, "name": f"LPA eps=0.005 @ {p}", **_lpa_radius(0.005),
                      "perturb.lpa.point": p} for p in ("stage1", "stage3"))
  methods = ((CE,) + lpa + lpa_points
             + _grid(LA, "LA", "perturb.logit_adjust.tau", (0.5, 1.0, 1.5, 2.0))
             + _grid(LDAM, "LDAM-DRW", "perturb.ldam.max_margin", (0.1, 0.3, 0.5, 0.8))
             + _grid(LPL, "LPL", "perturb.lpl.alpha", (0.0125, 0.025, 0.05, 0.1))
             + _grid(MIXUP, "Mixup", "perturb.manifold_mixup.alpha", (0.2, 0.5, 1.0, 2.0))
             + _grid(ADV, "Adv", "perturb.adversarial.eps", (0.25, 1.0, 2.0, 4.0))
             + _grid(LPG, "LPG", "perturb.lpg.eps", (0.05, 0.1, 0.2, 0.4)))
  return _suite("fmnist_lt_tune", "longtail.py:quick", methods, seeds=(0,),
                overrides={**FMNIST_LT_VAL, "optim.num_epochs": TUNE_EPOCHS}, description=(
                    f"Validation tuning: Fashion-MNIST-LT IR 100, CNN 16-32-64, "
                    f"{TUNE_EPOCHS} epochs, 90% train / 10% validation, one knob per "
                    "method (LPA: relative radius ε = Δε, and point), 1 seed."))


MAIN_EPOCHS = TUNE_EPOCHS
MAIN_SEEDS = (0, 1, 2, 3, 4)
# The radius the long-tail suites below were run with: longtail.py:quick's LPA default until
# issue 31 (fmnist_lt_tune's ε 0.01; the default is now QUICK_LPA_GUARDED's ε 0.005).  Their
# plans state it so they keep planning the configs their records hold; the records' suite.json
# predates the line, so a sweep into their committed folder asks for --stale=rerun, which
# rewrites suite.json and keeps every run (its config is the planned one).
LT_LPA_V3 = {"perturb.lpa.eps": 0.01, "perturb.lpa.delta_eps": 0.01}


def fmnist_lt_main():
  """The main table (issue 16, step 3): the full 14,886-image Fashion-MNIST-LT training set
  (no validation split), the full test set, 30 epochs, 5 seeds, the quick config's
  validation-tuned defaults.  Run seed by seed (``--seeds=0``, then 1, ...) so that a complete
  table of one seed exists first."""
  from lpa_jax.models import get_model
  from experiments.registry import logit_equivalent_point
  logit_point = logit_equivalent_point(get_model("cnn", 10, widths=(16, 32, 64)).points)
  la_lpl = {"perturb.logit": "logit_adjust,lpl"}
  methods = (CE, LA, LDAM, LPL, {"name": "LA+LPL", **la_lpl}, LPA,
             {**LPA, "name": f"LPA @ {logit_point} (logit-equivalent)",
              "perturb.lpa.point": logit_point},
             {**LPA, "name": "LPA+LA", "perturb.logit": "logit_adjust"},
             {**LPA, "name": "LPA+LA+LPL", **la_lpl}, MIXUP, ADV, LPG)
  return _suite("fmnist_lt_main", "longtail.py:quick", methods, seeds=MAIN_SEEDS,
                overrides={"optim.num_epochs": MAIN_EPOCHS, "train.checkpoint_every": 5,
                           **LT_LPA_V3},
                description=(
                    f"Main table: Fashion-MNIST-LT IR 100 (all 14,886 training images), full "
                    f"test set, CNN 16-32-64, {MAIN_EPOCHS} epochs (cosine), the quick "
                    "config's validation-tuned defaults, 5 seeds."))


def mean_varied_eps(eps: float, delta_eps: float, num_classes: int) -> float:
  """The class mean of the varied radius ``ε + Δε·|τ − q_c|`` under the long-tail split
  (before the depth factor, which fixed and varied radii share): the fixed radius that spends
  the same total budget.  With ``q_c`` the frequency rank scaled to [0, 1] it does not depend
  on the counts, only on ``C``.

  >>> round(mean_varied_eps(0.01, 0.01, 10), 6)
  0.012889
  """
  from lpa_jax.perturb.classes import frequency_split
  split = frequency_split(list(range(num_classes, 0, -1)))
  return round(float(eps + delta_eps * abs(split.tau - split.q_C).mean()), 6)


def fmnist_lt_mechanism():
  """Mechanism controls (issue 16, step 4), 3 seeds, the main table's protocol: LPA with a
  fixed radius at the varied radius's smallest value (ε, no Δε term) and at its mean over the
  classes (:func:`mean_varied_eps`), head-contractive only and tail-expansive only (explicit
  signs; the 4 most frequent classes are the head, classes are ordered by frequency; a
  constant split has ``q = τ = 0``, so their radius is ε), β 0.5 / 0.9 beside the default 0.7,
  and LPA at every point of the network (the default and the logit-equivalent points, and
  LPL, come from fmnist_lt_main's seeds 0-2)."""
  from experiments.configs.longtail import QUICK_TUNED
  from lpa_jax.models import get_model
  from experiments.registry import default_point, logit_equivalent_point
  points = get_model("cnn", 10, widths=(16, 32, 64)).points
  mean_eps = mean_varied_eps(QUICK_TUNED["lpa"]["eps"], QUICK_TUNED["lpa"]["delta_eps"], 10)
  # The default point, the logit-equivalent one and LPL are main-table runs (5 seeds there).
  main_points = ("logits", default_point(points), logit_equivalent_point(points))
  head = 4
  methods = (
      {**LPA, "name": "LPA fixed radius", "perturb.lpa.varied": False},
      {**LPA, "name": "LPA fixed radius (varied mean)", "perturb.lpa.varied": False,
       "perturb.lpa.eps": mean_eps},
      {**LPA, "name": "LPA head-contractive only", "perturb.lpa.split": "signs",
       "perturb.lpa.signs": (-1,) * head + (0,) * (10 - head)},
      {**LPA, "name": "LPA tail-expansive only", "perturb.lpa.split": "signs",
       "perturb.lpa.signs": (0,) * head + (1,) * (10 - head)},
      *({**LPA, "name": f"LPA beta={b:g}", "perturb.lpa.beta": b} for b in (0.5, 0.9)),
      *({**LPA, "name": f"LPA @ {p}", "perturb.lpa.point": p, "point": p}
        for p in points if p not in main_points))
  return _suite("fmnist_lt_mechanism", "longtail.py:quick", methods, seeds=(0, 1, 2),
                overrides={"optim.num_epochs": MAIN_EPOCHS, "train.checkpoint_every": 5,
                           **LT_LPA_V3},
                description=(
                    f"Mechanism controls on Fashion-MNIST-LT IR 100 (all training images, "
                    f"full test set, CNN 16-32-64, {MAIN_EPOCHS} epochs): LPA's radius rule, "
                    "direction, β and the points the main table does not run (CE, LPA at the "
                    "default and logit-equivalent points and LPL are in fmnist_lt_main)."))


def repro_sample():
  """A reproduction sample: one short run of each kind of method the train step wires
  differently (CE, LPA, LPA+LPL, LDAM-DRW, Manifold Mixup, SAM, LPG, GAF, clipping), small
  enough to rerun in minutes.  Made once at a commit before a refactor and committed; rerun at
  a later commit into another root, ``python -m experiments.compare`` says whether every run
  (test accuracy, per-class accuracy, per-sample predictions) is bit-identical.  Run it with
  one XLA thread on both sides: the thread count changes XLA:CPU's sums."""
  methods = (CE, LPA, LPA_LPL, LDAM, MIXUP, SAM, LPG, GAF, CLIP)
  return _suite("repro_sample", "longtail.py:quick", methods, seeds=(0,), overrides={
      "model.kwargs.widths": (8, 16, 32), "optim.num_epochs": 2, "data.n_max": 1000,
      "data.test_subset": 1000, "train.checkpoint_every": 1, **LT_LPA_V3}, description=(
          "Reproduction sample: Fashion-MNIST-LT IR 100 (head 1000 images), 1000 test images, "
          "CNN 8-16-32, 2 epochs, the quick config's defaults, 9 methods x 1 seed."))


# --- Issue 20: the other tasks, with the settings fmnist_lt_tune chose (longtail.QUICK_TUNED).
def repro_balanced():
  """The reproduction check for what ``repro_sample`` cannot see: splits that re-split from
  class statistics each epoch (balanced rule), on the noisy-label quick task (3 epochs, 200
  images per class): LPA+LPL, LPG, and adaptive LPA re-choosing its point every epoch."""
  methods = (
      {**LPA_LPL, "name": "LPA+LPL (balanced split)"},
      {**LPG, "name": "LPG (balanced split)"},
      {"name": "Adaptive LPA (balanced split)", "perturb.activation": "lpa_adaptive",
       "perturb.lpa_adaptive.every": 1})
  # The radius its records were made with (noisy.py's LPA radius was later tuned to 0.01):
  # the suite checks re-splitting reproduces, so it keeps the settings of its records.
  radius = {f"perturb.{m}.{k}": 0.1 for m in ("lpa", "lpa_adaptive") for k in ("eps", "delta_eps")}
  return _suite("repro_balanced", "noisy.py:quick", methods, seeds=(0,), overrides={
      "optim.num_epochs": 3, "data.n_max": 200, "data.test_subset": 500,
      "train.checkpoint_every": 1, **radius}, description=(
          "Reproduction check for balanced splits refreshed from class statistics: "
          "Fashion-MNIST, 40 % symmetric noise, 200 images per class, 3 epochs, seed 0."))


RMNIST_DOMAINS = ("0°", "15°", "30°", "45°", "60°", "75°")
DG_EPOCHS = 40  # rmnist_schedule: ERM's training-domain validation accuracy peaks at 40 (of 5-80)


def _tuned_overrides() -> dict:
  from experiments.configs.longtail import QUICK_TUNED
  return {f"perturb.{m}.{k}": v for m, block in QUICK_TUNED.items() for k, v in block.items()}


def rmnist_schedule():
  """ERM on Rotated MNIST (test domain 0°) for 5 to 80 epochs: the DG schedule (20 epochs, the
  first plan's longest, had not plateaued: experiments/results/rmnist_schedule)."""
  methods = tuple({"name": f"ERM {e} epochs", "optim.num_epochs": e}
                  for e in (5, 10, 20, 40, 80))
  return _suite("rmnist_schedule", "domain.py:quick", methods, seeds=(0,),
                overrides={"train.checkpoint_every": 5}, description=(
                    "Rotated MNIST, test domain 0°, 2000 images per domain (80 % train, 20 % "
                    "training-domain validation), CNN 16-32-64; ERM for 5 / 10 / 20 / 40 / 80 "
                    "epochs."))


# rmnist_dg: LPA all-positive at fmnist_lt_tune's ε 0.01 moved the loss by 0.014-0.016 nats (2nd
# half of training) in all 18 runs, below SPEC §1's 0.05 floor: with every class expansive
# (no contractive head to collapse) the task differs, so ε is chosen again on its own
# training-domain validation among these, Δε = ε (0.1 is the library's default).
DG_LPA_EPS = (0.03, 0.1)


def rmnist_dg():
  """Leave-one-domain-out on all six Rotated MNIST domains, 3 seeds: ERM, LPA (every class
  expansive, the paper's DG rule) at ε 0.01 and :data:`DG_LPA_EPS`, Manifold Mixup,
  adversarial feature perturbation."""
  lpa_eps = tuple(_named({**LPA, "perturb.lpa.eps": e, "perturb.lpa.delta_eps": e},
                         f"LPA (all-positive) ε={e:g}") for e in DG_LPA_EPS)
  bases = (_named(CE, "ERM"), _named(LPA, "LPA (all-positive)"), *lpa_eps, MIXUP, ADV)
  methods = tuple({**m, "name": f"{m['name']} @ {d}", "data.test_domain": k, "domain": d,
                   "base": m["name"]} for m in bases for k, d in enumerate(RMNIST_DOMAINS))
  return _suite("rmnist_dg", "domain.py:quick", methods, seeds=(0, 1, 2),
                overrides={"optim.num_epochs": DG_EPOCHS, "train.checkpoint_every": 5,
                           **_tuned_overrides()}, description=(
                    f"Rotated MNIST, leave one domain out over all six domains, 2000 images "
                    f"per domain (80 % train, 20 % training-domain validation), CNN 16-32-64, "
                    f"{DG_EPOCHS} epochs, radii and α from fmnist_lt_tune."))


NOISY_EPOCHS = 20  # noisy_schedule: CE's final test accuracy 81.2 / 83.9 / 83.7 % at 10 / 20 / 40
# epochs (40 % symmetric); beyond 20 it stops moving while memorised noisy labels rise 2.4 -> 4.3 %
# 1000 images per class (10,000): 72 runs fit issue 20's budget; all 60,000 would take ~4x.
NOISY_N = 1000
NOISE_SETTINGS = {"sym20": ("symmetric", 0.2), "sym40": ("symmetric", 0.4),
                  "sym60": ("symmetric", 0.6), "asym40": ("asymmetric", 0.4)}


def noisy_schedule():
  """CE on Fashion-MNIST with 40 % symmetric noise for 10, 20 and 40 epochs."""
  methods = tuple({"name": f"CE {e} epochs", "optim.num_epochs": e} for e in (10, 20, 40))
  return _suite("noisy_schedule", "noisy.py:quick", methods, seeds=(0,),
                overrides={"train.checkpoint_every": 5, "data.n_max": NOISY_N}, description=(
                    f"Fashion-MNIST ({NOISY_N} training images per class), 40 % symmetric "
                    "noise, clean test set, CNN 16-32-64; CE for 10 / 20 / 40 epochs."))


def _noisy(setting: str):
  """One noise setting of issue 20's noisy-label suite, 3 seeds: CE, LPA, LPA with every class
  expansive, LPG, GAF, GAF's learning-rate-matched control (plain SGD at lr × αβ) and SAM.

  LPA all-positive is a control added after ``noisy_fmnist_sym40`` had run: there LPA's balanced
  split (the hard half of the classes expansive, the easy half contractive) fell 2.2 points
  below CE; removing the contractive half says whether that half is the cause."""
  from lpa_jax.perturb.gradient import gaf_lr_factor
  from experiments.configs import noisy
  kind, rate = NOISE_SETTINGS[setting]
  lr = noisy.get_config("quick").optim.lr
  gaf_control = {"name": "GAF lr-matched control (SGD)",
                 "optim.lr": lr * gaf_lr_factor(0.1, 20.0)}
  name = f"noisy_fmnist_{setting}"
  lpa_positive = _named({**LPA, "perturb.lpa.split": "all_positive"}, "LPA (all-positive)")
  methods = (CE, LPA, lpa_positive, LPG, GAF, gaf_control, SAM)
  return _suite(name, "noisy.py:quick", methods, seeds=(0, 1, 2),
                overrides={"data.noise_type": kind, "data.noise_rate": rate,
                           "data.n_max": NOISY_N, "optim.num_epochs": NOISY_EPOCHS,
                           "train.checkpoint_every": 5,
                           **_tuned_overrides()}, description=(
                    f"Fashion-MNIST ({NOISY_N} training images per class), {rate:.0%} {kind} label "
                    f"noise, clean test set, CNN 16-32-64, {NOISY_EPOCHS} epochs, radii from "
                    "fmnist_lt_tune; last and best epoch's test accuracy."))


CIFAR_LT_PROBE_EPOCHS = 30
# cifar_lt_schedule: CE at IR 10 reaches 66.25 / 70.04 / 71.44 % at 30 / 45 / 60 epochs (seed 0);
# 60 is the longest schedule issue 20's budget allows for the 15-run table (2147 s a run).
CIFAR_LT_EPOCHS = 60


def cifar_lt_probe():
  """Issue 20's long-tail CIFAR question, asked cheaply first: CE on the published CIFAR-10
  (JPEG-75)-LT settings (all 5000 images of the largest class, IR 100 / 50 / 10: 12,406 /
  13,996 / 20,431 images) with the quick_cifar10 CNN (32-64-128, crop and flip) for
  30 epochs, one seed: which is the cheapest at which CE learns every class,
  and what one run costs on this machine.  The table of 5 methods x 3 seeds runs there only if
  that cost fits the budget."""
  methods = tuple({"name": f"CE IR {ir:g}", "data.imbalance_ratio": float(ir)}
                  for ir in (100, 50, 10))
  return _suite("cifar_lt_probe", "longtail.py:quick_cifar10", methods, seeds=(0,),
                overrides={"data.n_max": 5000, "optim.num_epochs": CIFAR_LT_PROBE_EPOCHS,
                           "train.checkpoint_every": 2}, description=(
                    "CIFAR-10 (JPEG-75)-LT, n_max 5000 (the published profile), IR 100 / 50 / "
                    "10, full test set, CNN 32-64-128, crop+flip, 30 epochs, "
                    "CE, seed 0: where CE learns every class, and the cost of a run."))


def cifar_balanced_probe():
  """Issue 20's balanced question, asked cheaply first: CE on CIFAR-10 (JPEG-75) with 1000
  training images per class (10,000) and the balanced quick config's CNN (32-64-128, crop and
  flip) for 15 and 30 epochs, one seed, with a 10 % validation split: whether 30 epochs
  reach a plateau at this size, and what one run costs, before the 5-method table."""
  methods = tuple({"name": f"CE {e} epochs", "optim.num_epochs": e} for e in (15, 30))
  return _suite("cifar_balanced_probe", "balanced.py:quick", methods, seeds=(0,),
                overrides={"data.n_max": 1000, "data.val_fraction": 0.1,
                           "train.checkpoint_every": 2}, description=(
                    "CIFAR-10 (JPEG-75), 1000 training images per class (10 % held out for "
                    "validation), full test set, CNN 32-64-128, crop+flip; CE for 15 / 30 "
                    "epochs, seed 0: the schedule and cost of the balanced suite."))


def cifar_lt_schedule():
  """Whether cifar_lt_probe's 30 epochs are a plateau at the ratio it picked (IR 10: the
  cheapest at which CE's every class is above chance; at IR 50 the rarest two were at 3 and
  5 %): CE for 45 and 60 epochs, seed 0, the probe's protocol otherwise; the 30-epoch run is
  cifar_lt_probe's ``CE IR 10``.  At 30 epochs CE's training accuracy was 77 % and its loss
  still falling."""
  methods = tuple({"name": f"CE IR 10, {e} epochs", "optim.num_epochs": e} for e in (45, 60))
  return _suite("cifar_lt_schedule", "longtail.py:quick_cifar10", methods, seeds=(0,),
                overrides={"data.n_max": 5000, "data.imbalance_ratio": 10.0,
                           "train.checkpoint_every": 2}, description=(
                    "CIFAR-10 (JPEG-75)-LT, n_max 5000, IR 10, full test set, CNN 32-64-128, "
                    "crop+flip, CE for 45 / 60 epochs, seed 0: is 30 a plateau?"))


def cifar_balanced_schedule():
  """Whether the balanced CIFAR-10 suite needs more than cifar_balanced_probe's 30 epochs (CE
  gained 5.6 points from 15 to 30 and ended at 69 % training accuracy): CE for 60 epochs,
  seed 0, the probe's protocol otherwise."""
  return _suite("cifar_balanced_schedule", "balanced.py:quick",
                ({"name": "CE 60 epochs", "optim.num_epochs": 60},), seeds=(0,),
                overrides={"data.n_max": 1000, "data.val_fraction": 0.1,
                           "train.checkpoint_every": 2}, description=(
                    "CIFAR-10 (JPEG-75), 1000 training images per class (10 % held out for "
                    "validation), full test set, CNN 32-64-128, crop+flip; CE for 60 epochs, "
                    "seed 0: is 30 a plateau?"))


CIFAR_LT_IRS = (100, 50, 10)


def _cifar_lt_protocol(ir: int) -> dict:
  """The long-tail CIFAR table's data and schedule (cifar_lt_probe's profile, n_max 5000, at
  ``ir``; :data:`CIFAR_LT_EPOCHS` epochs), shared by the table and its tuning."""
  return {"data.n_max": 5000, "data.imbalance_ratio": float(ir),
          "optim.num_epochs": CIFAR_LT_EPOCHS, "train.checkpoint_every": 2}


# LPA's radius (relative ε = Δε) on CIFAR-10 (JPEG-75)-LT, chosen by cifar_lt_tune's rule
# (experiments/results/cifar_lt_tune); fmnist_lt_tune's 0.01 collapsed the network here.
CIFAR_LT_LPA_EPS = 0.002


def _cifar_lt(ir: int):
  """Issue 20's long-tail CIFAR table at one imbalance ratio, 3 seeds: CE, LA, LDAM-DRW, LPA
  and LPA+LA on the cifar_lt_probe protocol (n_max 5000, quick_cifar10 CNN, crop+flip) for
  :data:`CIFAR_LT_EPOCHS` epochs (cifar_lt_schedule) with fmnist_lt_tune's radii, except
  LPA's, which is cifar_lt_tune's (:data:`CIFAR_LT_LPA_EPS`).  It runs at the cheapest ratio
  at which cifar_lt_probe's CE learns every class: IR 10."""
  lpa = {**LPA, "perturb.lpa.eps": CIFAR_LT_LPA_EPS, "perturb.lpa.delta_eps": CIFAR_LT_LPA_EPS}
  methods = (CE, LA, LDAM, lpa, {**lpa, "name": "LPA+LA", "perturb.logit": "logit_adjust"})
  return _suite(f"cifar_lt_ir{ir}", "longtail.py:quick_cifar10", methods, seeds=(0, 1, 2),
                overrides={**_cifar_lt_protocol(ir), **_tuned_overrides()}, description=(
                    f"CIFAR-10 (JPEG-75)-LT, n_max 5000, IR {ir}, full test set, CNN "
                    f"32-64-128, crop+flip, {CIFAR_LT_EPOCHS} epochs, radii from "
                    f"fmnist_lt_tune, LPA's from cifar_lt_tune (ε = Δε = {CIFAR_LT_LPA_EPS:g})."))


CIFAR_LT_TUNE_EPS = (0.002, 0.005, 0.01, 0.001)


def cifar_lt_tune():
  """LPA's radius tuned again on CIFAR-10 (JPEG-75)-LT IR 10's own validation data: at
  fmnist_lt_tune's relative ε 0.01 (Δε 0.01) the first LPA run of cifar_lt_ir10 moved the
  loss of the classes it perturbs by 1.04 nats in epoch 13 and its test accuracy fell to
  10.8 % (CE's seed 0: 60.7 %).  ε = Δε in :data:`CIFAR_LT_TUNE_EPS`, seed 0, cifar_lt_ir10's
  protocol with 10 % of the training set held out for validation; a run whose loss change
  passes the 1-nat ceiling stops there.  Rule, fixed before the runs: among the runs that
  finish, the radii whose validation balanced accuracy is within one image of the rarest
  validation class of the best tie; of those, the one whose loss change over the second
  half lies between the 0.05-nat floor and the ceiling, then the best on validation."""
  methods = _lpa_grid(LPA, "LPA", CIFAR_LT_TUNE_EPS)
  return _suite("cifar_lt_tune", "longtail.py:quick_cifar10", methods, seeds=(0,),
                overrides={**_cifar_lt_protocol(10), "data.val_fraction": 0.1,
                           "train.max_loss_change_action": "stop"}, description=(
                    f"CIFAR-10 (JPEG-75)-LT, n_max 5000, IR 10, 90 % train / 10 % "
                    f"validation, full test set, CNN 32-64-128, crop+flip, "
                    f"{CIFAR_LT_EPOCHS} epochs; LPA's relative radius ε = Δε, seed 0; a run "
                    "above the 1-nat loss-change ceiling stops."))


# --- Issue 31: is LPA's head/tail trade LPA or our choices?  Fidelity arms on the
# fmnist_lt_main protocol, tuned on fmnist_lt_tune's validation split by its rule, and the
# paper's balanced comparison on Fashion-MNIST.
# The paper's literal rule: an absolute radius and the raw step κ·g_c, ε over four decades
# (ε 0.1 is SPEC §1's default: reported once, as the inert end of the grid).
RAW_STEP_EPS = (0.1, 1.0, 10.0, 100.0)
# SPEC §1's median head split (5 of 10 classes contractive) against round(0.4·C) = 4, at the
# relative radii fmnist_lt_tune tried around the chosen ε 0.01.
MEDIAN_HEAD = 5
MEDIAN_HEAD_EPS = (0.005, 0.01, 0.02)
LPA_RAW = {**LPA, "perturb.lpa.normalize": False, "perturb.lpa.radius_mode": "absolute"}
LPA_MEDIAN = {**LPA, "perturb.lpa.num_head": MEDIAN_HEAD}


def fmnist_lt_arms_tune():
  """Validation tuning of LPA's fidelity arms (issue 31), fmnist_lt_tune's protocol: 30
  epochs, 90 % train / 10 % stratified validation, seed 0, selection by validation balanced
  accuracy with fmnist_lt_tune's tie width.  CE and the default LPA (ε 0.01) are that suite's
  runs (same config, same split)."""
  raw = _lpa_grid(LPA_RAW, "LPA raw step abs", RAW_STEP_EPS)
  median = _lpa_grid(LPA_MEDIAN, "LPA median head", MEDIAN_HEAD_EPS)
  return _suite("fmnist_lt_arms_tune", "longtail.py:quick", raw + median, seeds=(0,),
                overrides={**FMNIST_LT_VAL, "optim.num_epochs": TUNE_EPOCHS}, description=(
                    f"Validation tuning of LPA's fidelity arms: Fashion-MNIST-LT IR 100, CNN "
                    f"16-32-64, {TUNE_EPOCHS} epochs, 90% train / 10% validation, seed 0; "
                    "the paper's raw step with an absolute radius over four decades, and "
                    f"SPEC §1's median head split ({MEDIAN_HEAD} head classes)."))


# The paper's balanced comparison at small scale: Fashion-MNIST, 1000 training images per
# class (clean labels), the quick CNN.  Tuning runs carve a stratified 10 % validation split
# from those images; the main runs train on all of them.
FMNIST_BAL = {"data.n_max": 1000, "train.checkpoint_every": 5}
FMNIST_BAL_VAL = {**FMNIST_BAL, "data.val_fraction": 0.1}


def fmnist_bal_schedule():
  """CE at 15, 30 and 60 epochs (cosine) on the balanced task: where validation accuracy
  plateaus, the schedule of fmnist_bal_tune and fmnist_bal_main."""
  methods = tuple({"name": f"CE {e} epochs", "optim.num_epochs": e} for e in (15, 30, 60))
  return _suite("fmnist_bal_schedule", "balanced.py:quick_fmnist", methods, seeds=(0,),
                overrides=FMNIST_BAL_VAL, description=(
                    "Fashion-MNIST, 1000 training images per class (90% train / 10% "
                    "stratified validation), full test set, CNN 16-32-64; CE for 15 / 30 / 60 "
                    "epochs."))




# Arm 1: the strength set in nats (radius_mode="loss", SPEC §1): the per-class radius adapts
# every step so that the class's mean |loss change| tracks the target λ; the start is the
# chosen relative radius ε 0.01 (fmnist_lt_tune), the bounds the library's defaults.
LOSS_TARGETS = (0.03, 0.1, 0.3)


def fmnist_lt_loss_tune():
  """Validation tuning of LPA with the strength set in nats (issue 31, arm 1), fmnist_lt_tune's
  protocol and rule: the target λ over a decade (and a half), seed 0."""
  methods = tuple({**LPA, "name": f"LPA loss target={t:g}", "perturb.lpa.radius_mode": "loss",
                   "perturb.lpa.target": t} for t in LOSS_TARGETS)
  return _suite("fmnist_lt_loss_tune", "longtail.py:quick", methods, seeds=(0,),
                overrides={**FMNIST_LT_VAL, "optim.num_epochs": TUNE_EPOCHS, **LT_LPA_V3},
                description=(
                    f"Validation tuning of LPA's strength in nats: Fashion-MNIST-LT IR 100, "
                    f"CNN 16-32-64, {TUNE_EPOCHS} epochs, 90% train / 10% validation, seed 0; "
                    "radius_mode=loss, target λ (nats) per class, start at relative ε 0.01."))


# fmnist_bal_schedule (CE, seed 0, validation accuracy): 88.7 % at 15 epochs, 89.4 % at 30,
# 89.7 % at 60 (+3 of 900 validation images for twice the steps): 30 is where it plateaus
# (experiments/results/fmnist_bal_schedule).
BAL_EPOCHS = 30


def fmnist_bal_tune():
  """The paper's balanced comparison, tuning: CE and one knob per method, 4 values each, seed 0,
  selected on the 10 % validation split by fmnist_lt_tune's rule."""
  lpa = _lpa_grid(LPA, "LPA", (0.005, 0.01, 0.02, 0.05))
  methods = ((CE,) + lpa
             + _grid(MIXUP, "Mixup", "perturb.manifold_mixup.alpha", (0.2, 0.5, 1.0, 2.0))
             + _grid(LPL, "LPL", "perturb.lpl.alpha", (0.0025, 0.005, 0.01, 0.02)))
  return _suite("fmnist_bal_tune", "balanced.py:quick_fmnist", methods, seeds=(0,),
                overrides={**FMNIST_BAL_VAL, "optim.num_epochs": BAL_EPOCHS}, description=(
                    f"Balanced Fashion-MNIST, 1000 training images per class (90% train / 10% "
                    f"validation), CNN 16-32-64, {BAL_EPOCHS} epochs; CE, LPA (relative ε = "
                    "Δε, balanced split), Manifold Mixup α, LPL α; seed 0."))


# fmnist_bal_tune (seed 0, validation): LPA ε 0.02, Manifold Mixup α 0.5, LPL α 0.02 selected
# (experiments/results/fmnist_bal_tune); one seed ranks nothing, so the defaults run beside them.
# Seeds 0-2 ran first (pinned 2ad76ea), seeds 3-4 after (the same plan: seeds add to it).
BAL_SEEDS = (0, 1, 2, 3, 4)


def fmnist_bal_main():
  """The paper's balanced comparison (SPEC §5: LPA > LPL > Manifold Mixup > CE) at small scale:
  all 10,000 training images (1000 per class), the full test set, 30 epochs, 5 seeds; each
  method at its fmnist_bal_tune selection, and LPA also at the application's ε 0.01."""
  methods = ((CE,) + _lpa_grid(LPA, "LPA", (0.01, 0.02))
             + ({**MIXUP, "name": "Manifold Mixup alpha=0.5",
                 "perturb.manifold_mixup.alpha": 0.5},
                {**LPL, "name": "LPL alpha=0.02", "perturb.lpl.alpha": 0.02}))
  return _suite("fmnist_bal_main", "balanced.py:quick_fmnist", methods, seeds=BAL_SEEDS,
                overrides={**FMNIST_BAL, "optim.num_epochs": BAL_EPOCHS}, description=(
                    f"Balanced Fashion-MNIST, 1000 training images per class (no validation "
                    f"split), full test set, CNN 16-32-64, {BAL_EPOCHS} epochs, 5 seeds; CE, "
                    "LPA ε 0.01 / 0.02, Manifold Mixup α 0.5, LPL α 0.02."))


# Arms carried to the main protocol (issue 31, arm 4, and the shipped default).  Validation
# with the per-class guard (experiments.report_tables.guarded_selection: no class with >= 50
# validation images more than 5 points below CE; the pick the tied passing setting with the
# fewest changes to the default besides its radius) rules out ε 0.01 (T-shirt -20 points on
# validation) and keeps relative ε 0.005 (experiments/results/fmnist_lt_arms_main/README.md).
# The radius is written out, so the suite does not move with longtail.QUICK_TUNED.
GUARDED_EPS = 0.005


def fmnist_lt_arms_main():
  """LPA at the guarded validation pick (relative ε 0.005), LPA + LPL and that LPA + logit
  adjustment on fmnist_lt_main's protocol (all training images, full test set, 30 epochs),
  5 seeds paired with that suite's CE, LPA (ε 0.01) and LPL seed for seed.  Run seed by seed
  (``--seeds=0``, ...) so complete seeds exist first."""
  lpa = {**LPA, **_lpa_radius(GUARDED_EPS)}
  methods = ({**lpa, "name": f"LPA eps={GUARDED_EPS:g}"},
             {**lpa, "name": f"LPA eps={GUARDED_EPS:g}+LPL", "perturb.logit": "lpl"},
             {**lpa, "name": f"LPA eps={GUARDED_EPS:g}+LA", "perturb.logit": "logit_adjust"})
  return _suite("fmnist_lt_arms_main", "longtail.py:quick", methods, seeds=MAIN_SEEDS,
                overrides={"optim.num_epochs": MAIN_EPOCHS, "train.checkpoint_every": 5},
                description=(
                    f"LPA's guarded validation pick (relative ε {GUARDED_EPS:g}) alone, with "
                    f"LPL and with logit adjustment: Fashion-MNIST-LT IR 100 (all 14,886 "
                    f"training images), full test set, CNN 16-32-64, {MAIN_EPOCHS} epochs, 5 "
                    "seeds (CE, LPA ε 0.01 and LPL are fmnist_lt_main's)."))


CONVERGED = {"fmnist_lt_schedule": fmnist_lt_schedule, "fmnist_lt_tune": fmnist_lt_tune,
             "fmnist_lt_main": fmnist_lt_main, "fmnist_lt_mechanism": fmnist_lt_mechanism,
             "repro_sample": repro_sample, "repro_balanced": repro_balanced,
             "rmnist_schedule": rmnist_schedule, "rmnist_dg": rmnist_dg,
             "noisy_schedule": noisy_schedule, "cifar_lt_probe": cifar_lt_probe,
             "cifar_balanced_probe": cifar_balanced_probe,
             "cifar_lt_schedule": cifar_lt_schedule,
             "cifar_balanced_schedule": cifar_balanced_schedule,
             "cifar_lt_tune": cifar_lt_tune,
             "fmnist_lt_arms_tune": fmnist_lt_arms_tune,
             "fmnist_bal_schedule": fmnist_bal_schedule,
             "fmnist_lt_loss_tune": fmnist_lt_loss_tune, "fmnist_bal_tune": fmnist_bal_tune,
             "fmnist_bal_main": fmnist_bal_main, "fmnist_lt_arms_main": fmnist_lt_arms_main,
             **{f"noisy_fmnist_{k}": (lambda k=k: _noisy(k)) for k in NOISE_SETTINGS},
             **{f"cifar_lt_ir{ir}": (lambda ir=ir: _cifar_lt(ir)) for ir in CIFAR_LT_IRS}}


def get_config(arg: str = "smoke"):
  """A suite by name, or ``all`` / ``a,b`` for several (then ``suites`` lists them)."""
  if arg == "all" or "," in arg:
    names = SUITES if arg == "all" else tuple(a.strip() for a in arg.split(","))
    c = mlc.ConfigDict()
    c.suites = tuple(names)
    for n in names:  # fail now, not an hour in
      get_config(n)
    return c
  if arg == "smoke":
    return _suite("smoke", "longtail.py:quick", (CE, LPA), seeds=(0,), description=(
        "Test fixture: 2 methods x 1 seed, a few hundred images, 1 epoch."), overrides={
            "model.kwargs.widths": (4, 8, 8), "optim.num_epochs": 1, "optim.batch_size": 64,
            "data.n_max": 300, "data.test_subset": 200, "train.checkpoint_every": 1,
            **NARROW_LPA})
  if arg == "longtail_fmnist":
    return _suite(arg, "longtail.py:quick", LONGTAIL_METHODS, description=(
        "Fashion-MNIST-LT, IR 100 (head 1500 images: 6 many-, 3 medium-, 1 few-shot "
        "class), CNN 8-16-32, 5 epochs."), overrides={**_small_fmnist(5), "data.n_max": 1500})
  if arg == "longtail_cifar10":
    return _suite(arg, "longtail.py:quick_cifar10", LONGTAIL_METHODS, description=(
        "CIFAR-10 (JPEG-75)-LT, IR 100 (head 1000 images: 5 many-, 3 medium-, 2 few-shot "
        "classes), CNN 16-32-64, crop+flip, 6 epochs."),
                  overrides=_small_cifar(1000))
  if arg == "balanced_cifar10":
    return _suite(arg, "balanced.py:quick",
                  (CE, DROPOUT, MIXUP, SAM, LPL, LPA, LPA_LPL), description=(
                      "CIFAR-10 (JPEG-75), 300 images per class, CNN 16-32-64, 6 epochs."),
                  overrides=_small_cifar(300))
  if arg == "domain_rmnist":
    return _suite(arg, "domain.py:quick",
                  (_named(CE, "ERM"), MIXUP, ADV, _named(LPA, "LPA (all-positive)")),
                  description=("Rotated MNIST, test domain 0°, 1200 images per domain (80% "
                               "train, 20% in-domain val for model selection), CNN 16-32-64, "
                               "lr 0.1, 5 epochs."),
                  # 8-16-32 for 4 epochs at lr 0.05 reached only 50% train accuracy (measured).
                  overrides={**_small_fmnist(5), **_radii(4.0), "data.n_max": 1200,
                             "model.kwargs.widths": (16, 32, 64), "optim.lr": 0.1})
  if arg == "noisy_fmnist":
    return _suite(arg, "noisy.py:quick", (CE, GAF, CLIP, LPG, LPA), description=(
        "Fashion-MNIST, 40% symmetric noise, 500 images per class, CNN 8-16-32, 6 epochs."),
                  overrides={**_small_fmnist(6), "data.n_max": 500})
  if arg == "ablation_fmnist":
    direction = (
        _named({**LPA, "perturb.lpa.split": "all_positive"}, "LPA expansive only"),
        _named({**LPA, "perturb.lpa.split": "all_negative"}, "LPA contractive only"),
        _named({**LPA, "perturb.lpa.split": "longtail"}, "LPA both (long-tail split)"))
    points = tuple({**LPA, "name": f"LPA @ {p}", "perturb.lpa.point": p, "point": p}
                   for p in POINTS)
    return _suite(arg, "longtail.py:quick", direction + points, description=(
        "Fashion-MNIST-LT as in longtail_fmnist: LPA's direction (expansive / contractive / "
        "both) and its perturbation point, shallow to deep."),
                  overrides={**_small_fmnist(5), "data.n_max": 1500})
  if arg in CONVERGED:
    return CONVERGED[arg]()
  raise ValueError(f"Unknown suite {arg!r}; choose smoke, all, or one of "
                   f"{', '.join(SUITES + tuple(CONVERGED))} (or a comma-separated list)")
