"""Long-tail classification (SPEC §4): exponential profile ``n_c = n_max·IR^(−c/(C−1))``.

Run:
  python -m experiments.main --config=experiments/configs/longtail.py:quick --workdir=runs/lt
Variants:
  quick           Fashion-MNIST-LT, IR 100, small CNN, CPU in a few minutes
  quick_cifar10   CIFAR-10 (JPEG-75)-LT, IR 100 (n_max 1000), small CNN, CPU
  paper_cifar10   CIFAR-10-LT IR 100, ResNet-32, 200 epochs (warm-up 5, ÷100 at 160, ÷1e4 at 180)
  paper_cifar100  the same on CIFAR-100-LT
Override anything, e.g. ``--config.perturb.activation=lpa --config.data.imbalance_ratio=50``.
"""
from experiments.configs.common import base_config, validate
from experiments.configs.methods import network_radii


def get_config(arg: str = "quick"):
  c = base_config(split="longtail")
  c.data.imbalance_ratio = 100.0
  c.optim.weight_decay = 2e-4
  if arg == "quick":
    c.data.name = "fashion_mnist"
    c.model.kwargs.widths = (16, 32, 64)
    c.optim.update(dict(num_epochs=8, lr=0.05, schedule="cosine", warmup_epochs=1.0))
    tuned_on_validation(c)
    c.perturb.lpa.update(QUICK_LPA_GUARDED)
    c.perturb.lpa_adaptive.update(QUICK_LPA_GUARDED)
  elif arg == "quick_cifar10":
    c.data.update(dict(name="cifar10", n_max=1000))
    c.model.kwargs.widths = (32, 64, 128)
    c.train.augment = "crop_flip"
    c.optim.update(dict(num_epochs=15, lr=0.05, schedule="cosine", warmup_epochs=1.0))
  elif arg in ("paper_cifar10", "paper_cifar100"):
    c.data.name = arg.split("_")[1]
    c.model.name = "resnet32"
    c.train.augment = "crop_flip"
    c.train.eval_every = 10
    c.optim.update(dict(num_epochs=200, lr=0.1, schedule="step", warmup_epochs=5.0,
                        decay_epochs=(160, 180), decay_factors=(0.01, 0.0001)))
  else:
    raise ValueError(f"Unknown longtail variant {arg!r}; choose quick, quick_cifar10, "
                     "paper_cifar10 or paper_cifar100")
  return validate(network_radii(c))  # the paper networks' calibrated radii


# Chosen on the class-balanced validation split of Fashion-MNIST-LT (suite fmnist_lt_tune, 30
# epochs, seed 0; experiments/results/fmnist_lt_tune/README.md has the grid and the rule).
# Settings within one image of the rarest validation class (1.7 points of balanced accuracy)
# count as tied.  A default changes only when a setting beats it by more than that; it then
# becomes the best tied setting, preferring (activation methods) one whose loss change over
# training stays between the trainer's floor and ceiling (train.min/max_loss_change).  LPA's
# old relative ε 0.1 collapsed the head classes; the adversarial ε 4 and Mixup α 2 were beaten.
# LA τ 1, LDAM margin 0.5, LPL α 0.05 (tied with α 0.1) and LPG ε 0.1 stay.
QUICK_TUNED = {"lpa": dict(eps=0.01, delta_eps=0.01),
               "lpa_adaptive": dict(eps=0.01, delta_eps=0.01), "adversarial": dict(eps=2.0),
               "manifold_mixup": dict(alpha=0.2)}


# LPA's default on this task (issue 31), chosen again on the same validation runs with a
# per-class guard: fmnist_lt_tune's ε 0.01 won on balanced validation accuracy but did so by
# unlearning T-shirt/top (-20 points on validation, -27.7 on the test set over 5 seeds in
# fmnist_lt_main).  The guard rules out a setting under which a class with at least 50
# validation images falls more than 5 points below CE; among the passing settings tied with
# the best, the one changing least besides its radius is kept (report_tables.
# guarded_selection; the table in experiments/results/fmnist_lt_arms_main/README.md).  No
# setting tried, of the radius, the raw step, the median head split or the strength in
# nats, perturbs measurably (SPEC §1's 0.05-nat floor) and passes: the default is the
# conservative ε 0.005 (0.041 nats; 83.54 % balanced validation accuracy, CE 83.05 %).  On
# the test set over 5 seeds (fmnist_lt_arms_main) it keeps every class (worst: Dress -1.2
# points) and gains +0.51 points, below the 0.05-nat floor: close to plain training.
# QUICK_TUNED keeps fmnist_lt_tune's choice, which the other quick tasks' suites ran with.
QUICK_LPA_GUARDED = dict(eps=0.005, delta_eps=0.005)


def tuned_on_validation(c):
  """The ``quick`` variant's tuned hyper-parameters (:data:`QUICK_TUNED`)."""
  for name, values in QUICK_TUNED.items():
    c.perturb[name].update(values)
  return c
