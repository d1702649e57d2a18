"""Synthetic label noise on training labels (test labels always stay clean).

Both functions return ``(y_noisy, noise_mask)`` with ``noise_mask`` True exactly where the
label changed.

Example:
  >>> y = np.zeros(1000, np.int32)
  >>> y_noisy, mask = symmetric_noise(y, 0.4, num_classes=10, seed=0)
  >>> int(mask.sum()), bool((y_noisy[mask] != 0).all())
  (400, True)
"""

from __future__ import annotations

import numpy as np

# CIFAR-10 label ids: airplane 0, automobile 1, bird 2, cat 3, deer 4, dog 5, horse 7, truck 9.
# The classic asymmetric flips between visually similar classes (Patrini et al. 2017).
CIFAR10_ASYMMETRIC_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# Fashion-MNIST (ours, the same idea: five classes flip to the look-alike one): T-shirt/top 0 →
# Shirt 6, Pullover 2 → Coat 4, Ankle boot 9 → Sneaker 7, Sandal 5 ↔ Sneaker 7.
FASHION_MNIST_ASYMMETRIC_MAP = {0: 6, 2: 4, 9: 7, 5: 7, 7: 5}
ASYMMETRIC_MAPS = {"cifar10": CIFAR10_ASYMMETRIC_MAP,
                   "fashion_mnist": FASHION_MNIST_ASYMMETRIC_MAP}


def symmetric_noise(y: np.ndarray, rate: float, num_classes: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Flip exactly ``round(rate * N)`` labels, each to a uniformly random *other* class.

  An exact count (not per-label coin flips) makes the realised noise rate equal the nominal
  one, so results at different rates are not blurred by sampling error.

  >>> y_noisy, mask = symmetric_noise(np.arange(10) % 2, 0.5, 2, seed=0)
  >>> int(mask.sum())
  5
  """
  y = np.asarray(y, np.int32)
  rng = np.random.default_rng(seed)
  flip = rng.choice(y.size, size=int(round(rate * y.size)), replace=False)
  # Adding an offset in 1..C-1 (mod C) is uniform over the other classes and never a no-op.
  offset = rng.integers(1, num_classes, size=flip.size)
  y_noisy = y.copy()
  y_noisy[flip] = (y[flip] + offset) % num_classes
  return y_noisy, y_noisy != y


def asymmetric_noise(y: np.ndarray, rate: float, mapping: dict[int, int],
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Flip each label ``src`` of ``mapping`` to ``mapping[src]`` with probability ``rate``;
  other classes are never touched.

  >>> y_noisy, _ = asymmetric_noise(np.array([0, 0, 1]), 1.0, {0: 6}, seed=0)
  >>> y_noisy.tolist()
  [6, 6, 1]
  """
  y = np.asarray(y, np.int32)
  rng = np.random.default_rng(seed)
  target = y.copy()
  for src, dst in mapping.items():
    target[y == src] = dst
  flip = rng.random(y.size) < rate
  y_noisy = np.where(flip, target, y).astype(np.int32)
  return y_noisy, y_noisy != y


def asymmetric_noise_cifar10(y: np.ndarray, rate: float,
                             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Flip truck→automobile, bird→airplane, deer→horse, cat↔dog, each with probability ``rate``.

  Other classes are never touched.

  >>> y_noisy, _ = asymmetric_noise_cifar10(np.full(4, 9), 1.0, seed=0)
  >>> y_noisy.tolist()
  [1, 1, 1, 1]
  """
  return asymmetric_noise(y, rate, CIFAR10_ASYMMETRIC_MAP, seed)
