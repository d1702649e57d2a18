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
