"""Noisy-label learning (SPEC §4): symmetric (to a random other class) or asymmetric noise on
the training labels; test labels clean.

Run:
  python -m experiments.main --config=experiments/configs/noisy.py:quick --workdir=runs/noisy
Variants:
  quick               Fashion-MNIST, 40 % symmetric noise, small CNN, CPU
  quick_asym          Fashion-MNIST, 40 % asymmetric noise (T-shirt→Shirt, Pullover→Coat,
                      Ankle boot→Sneaker, Sandal↔Sneaker), small CNN, CPU
  paper_cifar10       CIFAR-10, symmetric noise (``--config.data.noise_rate`` 0.2/0.4/0.6/0.8),
                      ResNet-32, 200 epochs, lr 0.1 ÷10 at 100 and 150
  paper_cifar10_asym  CIFAR-10, 40 % asymmetric noise (truck→automobile, bird→airplane,
                      deer→horse, cat↔dog)

LPA here is not a recommended setting: in the noisy suites (experiments/results/README.md §3)
LPA with the balanced split lost to CE at 20 %, 40 % and 60 % symmetric noise (−0.66, −2.19
and −5.95 points), mostly through its contractive half, and at 40 % asymmetric noise it
perturbed below the 0.05-nat floor. GAF's gain there comes mostly from its smaller effective
learning rate (its learning-rate-matched control gains nearly as much, and more at 40 %
asymmetric); LPG tied CE under symmetric noise and beat it by +1.26 points under asymmetric.
"""
from experiments.configs.common import base_config, paper_protocol, validate
from experiments.configs.longtail import tuned_on_validation
from experiments.configs.methods import network_radii


def get_config(arg: str = "quick"):
  c = base_config(split="balanced")
  c.data.update(dict(noise_type="symmetric", noise_rate=0.4))
  if arg in ("quick", "quick_asym"):
    c.data.name = "fashion_mnist"
    if arg == "quick_asym":
      c.data.noise_type = "asymmetric"
    c.model.kwargs.widths = (16, 32, 64)
    c.optim.update(dict(num_epochs=6, lr=0.05, schedule="cosine"))
    # The small CNN's radii as the noisy suites ran them (fmnist_lt_tune's; see above).
    tuned_on_validation(c)
  elif arg in ("paper_cifar10", "paper_cifar10_asym"):
    c.data.name = "cifar10"
    if arg.endswith("asym"):
      c.data.noise_type = "asymmetric"
    paper_protocol(c, "resnet32")
  else:
    raise ValueError(f"Unknown noisy variant {arg!r}; choose quick, quick_asym, paper_cifar10 or "
                     "paper_cifar10_asym")
  return validate(network_radii(c))  # the paper networks' calibrated radii
