"""Balanced classification (SPEC §4).

Run:
  python -m experiments.main --config=experiments/configs/balanced.py:quick --workdir=runs/bal
Variants:
  quick               CIFAR-10 (JPEG-75), 1,000 images per class, small CNN, CPU
  quick_fmnist        Fashion-MNIST, small CNN, CPU
  paper_wrn_cifar10   WRN-28-10 on CIFAR-10, 200 epochs, lr 0.1 ÷10 at 100 and 150, wd 5e-4
  paper_r110_cifar10  ResNet-110 on CIFAR-10, same schedule
  paper_wrn_cifar100, paper_r110_cifar100   the same on CIFAR-100
"""
from experiments.configs.common import base_config, paper_protocol, validate
from experiments.configs.methods import network_radii

PAPER = {"wrn": "wrn28_10", "r110": "resnet110"}


def get_config(arg: str = "quick"):
  c = base_config(split="balanced")
  if arg == "quick":
    c.data.update(dict(name="cifar10", n_max=1000))
    c.model.kwargs.widths = (32, 64, 128)
    c.train.augment = "crop_flip"
    c.optim.update(dict(num_epochs=15, lr=0.05, schedule="cosine"))
  elif arg == "quick_fmnist":
    c.data.name = "fashion_mnist"
    c.model.kwargs.widths = (16, 32, 64)
    c.optim.update(dict(num_epochs=5, lr=0.05, schedule="cosine"))
  elif arg.startswith("paper_") and arg.count("_") == 2 and arg.split("_")[1] in PAPER:
    _, net, dataset = arg.split("_")
    if dataset not in ("cifar10", "cifar100"):
      raise ValueError(f"Unknown dataset in variant {arg!r}")
    c.data.name = dataset
    paper_protocol(c, PAPER[net])
  else:
    raise ValueError(f"Unknown balanced variant {arg!r}; choose quick, quick_fmnist or "
                     "paper_{wrn,r110}_{cifar10,cifar100}")
  return validate(network_radii(c))  # the paper networks' calibrated radii
