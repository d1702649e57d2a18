"""Long-tailed subsampling (Cui et al. 2019 / Cao et al. 2019 exponential profile).

Class ``c`` keeps ``n_c = floor(n_max * IR**(-c / (C - 1)))`` training images, so class 0 is
the head (``n_max``) and class ``C - 1`` the tail (``n_max / IR``). The test set stays
balanced.

Example:
  >>> int(longtail_counts(5000, 10, 100).sum())   # CIFAR-10-LT, IR=100
  12406
"""

from __future__ import annotations

import numpy as np


def longtail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
  """Per-class training counts of the exponential long-tail profile.

  >>> longtail_counts(100, 3, 100).tolist()
  [100, 10, 1]
  """
  c = np.arange(num_classes)
  exponent = -c / max(num_classes - 1, 1)
  return np.floor(n_max * float(imbalance_ratio) ** exponent).astype(np.int64)


def make_longtail(y: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
  """Indices keeping a seeded random ``counts[c]`` examples of each class ``c``.

  Returned sorted, so the kept subset preserves the original order.

  >>> y = np.array([0, 0, 0, 1, 1, 1])
  >>> np.bincount(y[make_longtail(y, np.array([3, 1]), seed=0)]).tolist()
  [3, 1]
  """
  rng = np.random.default_rng(seed)
  keep = []
  for c, n_c in enumerate(counts):
    idx = np.flatnonzero(y == c)
    if n_c > idx.size:
      raise ValueError(f"class {c} has {idx.size} examples, cannot keep {n_c}")
    keep.append(rng.permutation(idx)[:n_c])
  return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Seeded indices of at most ``size`` examples with class proportions preserved.

  Each example is ranked by its (random) position within its class divided by the class size,
  so taking the lowest ranks takes the same fraction of every class.

  >>> y = np.repeat(np.arange(4), 100)
  >>> np.bincount(y[stratified_subset(y, 40, seed=0)]).tolist()
  [10, 10, 10, 10]
  """
  if size >= y.size:
    return np.arange(y.size)
  rng = np.random.default_rng(seed)
  order = rng.permutation(y.size)
  rank = np.empty(y.size)
  for c in np.unique(y):
    members = order[y[order] == c]  # class members in random order
    rank[members] = np.arange(members.size) / members.size
  # Ties (same fraction in different classes) are broken by the random order.
  keep = np.lexsort((np.argsort(order), rank))[:size]
  return np.sort(keep)


def holdout_per_class(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A seeded boolean mask holding out ``round(fraction·n_c)`` examples of every class ``c``,
  at least one and at most ``n_c − 1`` (every class stays on both sides; a class with a
  single example stays in training).

  >>> y = np.repeat(np.arange(3), [100, 10, 2])
  >>> np.bincount(y[holdout_per_class(y, 0.1, seed=0)]).tolist()
  [10, 1, 1]
  """
  rng = np.random.default_rng(seed)
  mask = np.zeros(y.size, bool)
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    n_val = min(max(int(round(fraction * idx.size)), 1), idx.size - 1)
    mask[rng.permutation(idx)[:n_val]] = True
  return mask
