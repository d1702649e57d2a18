"""Domain-generalisation datasets built from MNIST, following DomainBed.

* Rotated MNIST: MNIST train+test shuffled, dealt into 6 equal shards (``images[d::6]``, as
  DomainBed does); shard ``d`` is rotated by ``ROTATED_MNIST_ANGLES[d]`` degrees.
* Colored MNIST (Arjovsky et al. 2019): 3 shards; binary label ``digit < 5`` flipped with
  probability 0.25; colour = label flipped with the environment's probability (0.1, 0.2, 0.9,
  i.e. colour agrees with the label +90%, +80%, -90% of the time); the image goes to channel
  ``colour`` of a 2-channel image. Images stay 28x28 (DomainBed subsamples them to 14x14
  while declaring a 2x28x28 input shape; we keep the full resolution).

The shard contents use a fixed seed, so every trial sees the same environments (DomainBed
also fixes them); only the 80/20 hold-out split and ``n_max`` subsets follow the trial seed.

Example:
  >>> x = np.zeros((2, 28, 28), np.uint8); x[:, 14, 20:] = 255   # a bar to the right
  >>> bool(rotate_images(x, 90.0)[0, :13, 13:15].any())            # now pointing up
  True
"""

from __future__ import annotations

import numpy as np

ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)
COLORED_MNIST_ENVS = (0.1, 0.2, 0.9)  # probability that colour disagrees with the label
COLORED_MNIST_NAMES = ("+90%", "+80%", "-90%")
COLORED_MNIST_CLASSES = ["digit 5-9", "digit 0-4"]
DOMAIN_SHUFFLE_SEED = 0


def rotate_images(x_NxHxW: np.ndarray, angle_deg: float) -> np.ndarray:
  """Rotate images counter-clockwise about their centre, bilinear, zero fill (uint8 in/out).

  Matches ``torchvision.transforms.functional.rotate(..., fill=0, BILINEAR)`` used by DomainBed
  and ``scipy.ndimage.rotate(reshape=False, order=1)``.

  >>> rotate_images(np.eye(3, dtype=np.uint8)[None] * 255, 0.0)[0].diagonal().tolist()
  [255, 255, 255]
  """
  n, h, w = x_NxHxW.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  t = np.deg2rad(angle_deg)
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  # Output pixel -> source pixel: rotate by -angle in (x right, y up) coordinates.
  xo, yo = c - cx, cy - r
  src_c = cx + np.cos(t) * xo + np.sin(t) * yo
  src_r = cy - (-np.sin(t) * xo + np.cos(t) * yo)
  r0, c0 = np.floor(src_r).astype(int), np.floor(src_c).astype(int)
  fr, fc = src_r - r0, src_c - c0
  img = x_NxHxW.astype(np.float32)
  out = np.zeros((n, h, w), np.float32)
  for dr, dc, wgt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                      (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
    rr, cc = r0 + dr, c0 + dc
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    out += img[:, np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)] * (wgt * inside)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _shards(x: np.ndarray, y: np.ndarray, n_domains: int):
  perm = np.random.default_rng(DOMAIN_SHUFFLE_SEED).permutation(len(y))
  x, y = x[perm], y[perm]
  return [(x[d::n_domains], y[d::n_domains]) for d in range(n_domains)]


def rotated_mnist(x_NxHxWx1: np.ndarray, y: np.ndarray):
  """Rotated MNIST domains: ``([(x_d, y_d), ...], domain_names)``, x_d is N,28,28,1 uint8.

  >>> x = np.zeros((12, 28, 28, 1), np.uint8); y = np.arange(12) % 10
  >>> doms, names = rotated_mnist(x, y); len(doms), names[1]
  (6, '15°')
  """
  shards = _shards(x_NxHxWx1, y, len(ROTATED_MNIST_ANGLES))
  domains = [(rotate_images(xs[..., 0], a)[..., None], ys.astype(np.int32))
             for (xs, ys), a in zip(shards, ROTATED_MNIST_ANGLES)]
  return domains, [f"{a}°" for a in ROTATED_MNIST_ANGLES]


def colored_mnist(x_NxHxWx1: np.ndarray, y: np.ndarray):
  """Colored MNIST domains: ``([(x_d, y_d), ...], domain_names)``, x_d is N,28,28,2 uint8.

  >>> x = np.ones((30, 28, 28, 1), np.uint8); y = np.arange(30) % 10
  >>> doms, names = colored_mnist(x, y); doms[0][0].shape, names
  ((10, 28, 28, 2), ['+90%', '+80%', '-90%'])
  """
  rng = np.random.default_rng(DOMAIN_SHUFFLE_SEED + 1)
  domains = []
  for (xs, ys), p_flip in zip(_shards(x_NxHxWx1, y, len(COLORED_MNIST_ENVS)),
                              COLORED_MNIST_ENVS):
    label = (ys < 5).astype(np.int32) ^ (rng.random(len(ys)) < 0.25)
    colour = label ^ (rng.random(len(ys)) < p_flip)
    x2 = np.zeros(xs.shape[:3] + (2,), np.uint8)
    x2[np.arange(len(ys)), :, :, colour] = xs[..., 0]
    domains.append((x2, label.astype(np.int32)))
  return domains, list(COLORED_MNIST_NAMES)


def leave_one_domain_out(domains, test_domain: int, holdout_fraction: float, seed: int,
                         n_max: int | None = None) -> dict:
  """DomainBed split: domain ``test_domain`` is the test set; every other domain is split
  into train / validation with ``int(n * holdout_fraction)`` held out (seeded).

  ``n_max`` (optional) caps every domain at a seeded random ``n_max`` images first.

  >>> doms = [(np.zeros((10, 1)), np.zeros(10, np.int32)) for _ in range(3)]
  >>> s = leave_one_domain_out(doms, 2, 0.2, seed=0)
  >>> len(s["y_train"]), len(s["y_val"]), len(s["y_test"]), np.unique(s["train_domain"]).tolist()
  (16, 4, 10, [0, 1])
  """
  rng = np.random.default_rng(seed)
  parts = {k: [] for k in ("x_train", "y_train", "train_domain", "x_val", "y_val",
                           "val_domain")}
  out = {}
  for d, (x, y) in enumerate(domains):
    idx = rng.permutation(len(y))
    if n_max is not None:
      idx = idx[:n_max]
    if d == test_domain:
      idx = np.sort(idx)
      out["x_test"], out["y_test"] = x[idx], y[idx]
      continue
    n_val = int(len(idx) * holdout_fraction)
    for split, sel in (("val", idx[:n_val]), ("train", idx[n_val:])):
      sel = np.sort(sel)
      parts[f"x_{split}"].append(x[sel])
      parts[f"y_{split}"].append(y[sel])
      parts[f"{split}_domain"].append(np.full(len(sel), d, np.int32))
  out.update({k: np.concatenate(v) for k, v in parts.items()})
  return out
