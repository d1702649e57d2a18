"""``load_task_data(cfg)``: one config in, the arrays of one experimental task out.

The config is an ``ml_collections.ConfigDict`` (or any object with attributes):

  name              'mnist' | 'fashion_mnist' | 'cifar10' | 'cifar100' | 'rotated_mnist' |
                    'colored_mnist'
  data_dir          offline copies (default: $LPA_DATA_DIR, then ../shared/data)
  cache_dir         prepared .npz arrays (default: $LPA_CACHE_DIR, then ~/.cache/lpa_jax)
  download          bool, allow TFDS downloads (default True)
  imbalance_ratio   None or 1 = balanced; > 1 = exponential long tail (class 0 is the head)
  n_max             per-class cap (long tail: the head count); for DG a cap per *domain*
  test_subset       keep at most this many test images (stratified, seeded)
  noise_type        'none' | 'symmetric' | 'asymmetric' (CIFAR-10, Fashion-MNIST);
                    noise_rate in [0, 1)
  test_domain       DG: index of the held-out domain; holdout_fraction (0.2) of every
                    training domain goes to the validation split
  val_fraction      standard tasks: this fraction of every class's training images (at least
                    one, leaving at least one) held out as a stratified validation split,
                    after long-tail subsampling and label noise (0 = none, the default)
  seed              int; seeds subsampling, noise and splits

Example (not run as a doctest: it loads CIFAR-10, the TFDS data):
  >>> import ml_collections                                           # doctest: +SKIP
  >>> cfg = ml_collections.ConfigDict(dict(name="cifar10", imbalance_ratio=100))  # doctest: +SKIP
  >>> data = load_task_data(cfg); data.name, data.num_train          # doctest: +SKIP
  ('CIFAR-10-LT (IR=100, JPEG-75)', 12406)
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from experiments.data import domains, longtail, noise, sources

STANDARD = ("mnist", "fashion_mnist", "cifar10", "cifar100")
DOMAIN = ("rotated_mnist", "colored_mnist")
NAMES = STANDARD + DOMAIN
NOISE_TYPES = ("none", "symmetric", "asymmetric")
DOMAIN_NAMES = {"rotated_mnist": [f"{a}°" for a in domains.ROTATED_MNIST_ANGLES],
                "colored_mnist": list(domains.COLORED_MNIST_NAMES)}
_DISPLAY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
            "cifar100": "CIFAR-100", "rotated_mnist": "Rotated MNIST",
            "colored_mnist": "Colored MNIST"}


@dataclasses.dataclass
class TaskData:
  """Arrays of one task: uint8 NHWC images, int32 labels (``y_test`` always clean).

  ``extras``: 'class_counts' (clean training counts per class, e.g. for many/medium/few-shot
  splits), 'source' ('official' / 'jpeg75'); with label noise 'y_train_clean', 'noise_mask';
  for DG 'train_domain', 'val_domain' (domain index per example), 'test_domain_index',
  'domain_names'.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  class_names: list[str]
  x_val: np.ndarray | None = None
  y_val: np.ndarray | None = None
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train(self) -> int:
    return int(len(self.y_train))

  def class_counts(self) -> np.ndarray:
    """Training examples per class (of the labels used for training, noisy or not)."""
    return np.bincount(self.y_train, minlength=self.num_classes)


@dataclasses.dataclass(frozen=True)
class _Options:
  name: str
  data_dir: str | None
  cache_dir: str | None
  download: bool
  imbalance_ratio: float
  n_max: int | None
  test_subset: int | None
  noise_type: str
  noise_rate: float
  test_domain: int
  holdout_fraction: float
  val_fraction: float
  seed: int


def _positive_int_or_none(field: str, value):
  if value is not None and (not _is_number(value) or int(value) != value or value < 1):
    raise ValueError(f"data.{field} must be a positive integer or None, got {value!r}")
  return None if value is None else int(value)


def _is_number(v) -> bool:
  """A finite int or float (not a bool, not a string)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(field: str, value, default) -> float:
  value = default if value is None else value
  if not _is_number(value):
    raise ValueError(f"data.{field} must be a finite number, got {value!r}")
  return float(value)


def check_options(cfg) -> None:
  """Raises ``ValueError`` naming the field when the data config ``cfg`` is invalid (what
  :func:`load_task_data` checks first), without loading anything.

  >>> import ml_collections
  >>> check_options(ml_collections.ConfigDict(dict(name="mnist", imbalance_ratio=0.5)))
  Traceback (most recent call last):
  ValueError: data.imbalance_ratio must be >= 1 (1 = balanced), got 0.5
  """
  _options(cfg)


def _options(cfg) -> _Options:
  """Read ``cfg`` with defaults and check every field, naming the one that is wrong."""
  get = lambda field, default: getattr(cfg, field, default)  # noqa: E731
  name = get("name", None)
  if name not in NAMES:
    raise ValueError(f"data.name={name!r} is not a known dataset; valid: {list(NAMES)}")
  ir = _number("imbalance_ratio", get("imbalance_ratio", None), 1.0)
  if ir < 1:
    raise ValueError(f"data.imbalance_ratio must be >= 1 (1 = balanced), got {ir}")
  if ir > 1 and name in DOMAIN:
    raise ValueError(f"data.imbalance_ratio: long-tail is not supported for {name!r}")
  noise_type = get("noise_type", "none") or "none"
  rate = _number("noise_rate", get("noise_rate", 0.0), 0.0)
  if noise_type not in NOISE_TYPES:
    raise ValueError(f"data.noise_type={noise_type!r}; valid: {list(NOISE_TYPES)}")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"data.noise_rate must be in [0, 1), got {rate}")
  if noise_type == "asymmetric" and name not in noise.ASYMMETRIC_MAPS:
    raise ValueError(f"data.noise_type='asymmetric' is defined only for "
                     f"{', '.join(noise.ASYMMETRIC_MAPS)} (their look-alike class pairs), not "
                     f"{name!r}; use 'symmetric'")
  if noise_type != "none" and name in DOMAIN:
    raise ValueError(f"data.noise_type: label noise is not supported for {name!r}")
  holdout = _number("holdout_fraction", get("holdout_fraction", 0.2), 0.2)
  if not 0.0 < holdout < 1.0:
    raise ValueError(f"data.holdout_fraction must be in (0, 1), got {holdout}")
  val_fraction = get("val_fraction", 0.0) or 0.0
  if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
    raise ValueError(f"data.val_fraction must be a number in [0, 1), got {val_fraction!r}")
  if val_fraction and name in DOMAIN:
    raise ValueError("data.val_fraction: domain tasks hold out data.holdout_fraction of every "
                     "training domain instead")
  test_domain = get("test_domain", 0) or 0
  if name in DOMAIN and test_domain not in range(len(DOMAIN_NAMES[name])):
    raise ValueError(f"data.test_domain={test_domain!r} out of range for {name!r}: valid "
                     f"0..{len(DOMAIN_NAMES[name]) - 1} ({DOMAIN_NAMES[name]})")
  seed = get("seed", 0)
  if not _is_number(seed) or int(seed) != seed:
    raise ValueError(f"data.seed must be an integer, got {seed!r}")
  return _Options(name=name, data_dir=get("data_dir", None), cache_dir=get("cache_dir", None),
                  download=bool(get("download", True)), imbalance_ratio=ir,
                  n_max=_positive_int_or_none("n_max", get("n_max", None)),
                  test_subset=_positive_int_or_none("test_subset", get("test_subset", None)),
                  noise_type=noise_type, noise_rate=rate,
                  test_domain=int(test_domain), holdout_fraction=holdout,
                  val_fraction=float(val_fraction), seed=int(seed))


def _subseed(seed: int, purpose: str) -> int:
  # Independent streams per purpose, so e.g. changing the noise does not change the subset.
  return zlib.crc32(f"{seed}/{purpose}".encode())


def _train_counts(opts: _Options, available: np.ndarray) -> np.ndarray | None:
  """Per-class training counts to keep, or None to keep everything."""
  from experiments.configs.common import InvalidConfig  # a ValueError, shown in one line
  if opts.imbalance_ratio > 1:
    # Default head size: the smallest class, so every class can supply its n_c.
    n_max = opts.n_max or int(available.min())
    counts = longtail.longtail_counts(n_max, len(available), opts.imbalance_ratio)
    if (counts == 0).any():
      # A class with no training image has no statistics, no radius and no accuracy to learn.
      need = int(np.ceil(opts.imbalance_ratio))
      while longtail.longtail_counts(need, len(available), opts.imbalance_ratio).min() < 1:
        need += 1
      raise InvalidConfig(
          f"Invalid config: data.n_max={n_max} at data.imbalance_ratio="
          f"{opts.imbalance_ratio:g} leaves "
          f"class(es) {np.flatnonzero(counts == 0).tolist()} with 0 training images "
          f"(counts {counts.tolist()}); use data.n_max >= {need} or a smaller imbalance ratio")
    if (counts > available).any():
      raise InvalidConfig(f"Invalid config: data.n_max={n_max} needs {counts.tolist()} images "
                          f"per class but only {available.tolist()} exist")
    return counts
  if opts.n_max is not None:
    return np.minimum(available, opts.n_max)
  return None


def _standard_task(opts: _Options) -> TaskData:
  raw = sources.load_raw(opts.name, opts.data_dir, opts.cache_dir, opts.download)
  num_classes = len(raw.class_names)
  x, y = raw.x_train, raw.y_train
  counts = _train_counts(opts, np.bincount(y, minlength=num_classes))
  if counts is not None:
    keep = longtail.make_longtail(y, counts, _subseed(opts.seed, "longtail"))
    x, y = x[keep], y[keep]
  extras = {"class_counts": np.bincount(y, minlength=num_classes), "source": raw.source}
  base, tags = _DISPLAY[opts.name], ["JPEG-75"] if raw.source == "jpeg75" else []
  if opts.imbalance_ratio > 1:
    base, tags = base + "-LT", [f"IR={opts.imbalance_ratio:g}"] + tags
  if opts.noise_type != "none":
    nseed = _subseed(opts.seed, "noise")
    if opts.noise_type == "symmetric":
      y_noisy, mask = noise.symmetric_noise(y, opts.noise_rate, num_classes, nseed)
    else:
      y_noisy, mask = noise.asymmetric_noise(y, opts.noise_rate,
                                             noise.ASYMMETRIC_MAPS[opts.name], nseed)
    extras.update(y_train_clean=y, noise_mask=mask)
    tags.append(f"{opts.noise_rate:.0%} {opts.noise_type} noise")
    y = y_noisy
  x_val = y_val = None
  if opts.val_fraction > 0:
    val = longtail.holdout_per_class(y, opts.val_fraction, _subseed(opts.seed, "val"))
    x_val, y_val = x[val], y[val].astype(np.int32)
    x, y = x[~val], y[~val]
    for k in ("y_train_clean", "noise_mask"):
      if k in extras:
        extras[k] = extras[k][~val]
    extras["class_counts"] = np.bincount(
        extras.get("y_train_clean", y), minlength=num_classes)
    tags.append(f"{opts.val_fraction:.0%} held out for validation")
  x_test, y_test = raw.x_test, raw.y_test
  if opts.test_subset is not None:
    keep = longtail.stratified_subset(y_test, opts.test_subset, _subseed(opts.seed, "test"))
    x_test, y_test = x_test[keep], y_test[keep]
  name = base + (f" ({', '.join(tags)})" if tags else "")
  return TaskData(name=name, x_train=x, y_train=y.astype(np.int32), x_test=x_test,
                  y_test=y_test.astype(np.int32), num_classes=num_classes,
                  class_names=list(raw.class_names), x_val=x_val, y_val=y_val, extras=extras)


def _domain_task(opts: _Options) -> TaskData:
  raw = sources.load_raw("mnist", opts.data_dir, opts.cache_dir, opts.download)
  x_all = np.concatenate([raw.x_train, raw.x_test])
  y_all = np.concatenate([raw.y_train, raw.y_test])
  if opts.name == "rotated_mnist":
    doms, domain_names = domains.rotated_mnist(x_all, y_all)
    class_names = list(raw.class_names)
  else:
    doms, domain_names = domains.colored_mnist(x_all, y_all)
    class_names = list(domains.COLORED_MNIST_CLASSES)
  s = domains.leave_one_domain_out(doms, opts.test_domain, opts.holdout_fraction,
                                   _subseed(opts.seed, "domains"), opts.n_max)
  x_test, y_test = s["x_test"], s["y_test"]
  if opts.test_subset is not None:
    keep = longtail.stratified_subset(y_test, opts.test_subset, _subseed(opts.seed, "test"))
    x_test, y_test = x_test[keep], y_test[keep]
  extras = {"train_domain": s["train_domain"], "val_domain": s["val_domain"],
            "test_domain_index": opts.test_domain, "domain_names": domain_names,
            "class_counts": np.bincount(s["y_train"], minlength=len(class_names)),
            "source": raw.source}
  name = f"{_DISPLAY[opts.name]} (test domain {domain_names[opts.test_domain]})"
  return TaskData(name=name, x_train=s["x_train"], y_train=s["y_train"], x_test=x_test,
                  y_test=y_test, num_classes=len(class_names), class_names=class_names,
                  x_val=s["x_val"], y_val=s["y_val"], extras=extras)


def check_finite_inputs(data: TaskData, chunk: int = 4096) -> None:
  """Raises :class:`~experiments.data.sources.DataCorrupt` when a split's images hold NaN or
  inf (float arrays only: uint8 images cannot), naming the split and the first such image.
  NaN training images would stop the first step as a NaN loss, blamed on the learning rate;
  NaN test images give NaN logits, scored as class 0: an accuracy on images that are not
  there.

  >>> images = np.zeros((2, 4, 4, 1), np.float32); images[1, 0, 0, 0] = np.nan
  >>> data = TaskData("bad", images, np.arange(2), images, np.arange(2), 2, ["a", "b"])
  >>> check_finite_inputs(data)
  Traceback (most recent call last):
  experiments.data.sources.DataCorrupt: bad: x_train holds 1 NaN or infinite value(s) in 1 of 2 ...
  """
  for split in ("x_train", "x_val", "x_test"):
    x = getattr(data, split)
    if x is None or not np.issubdtype(x.dtype, np.floating):
      continue
    # Per image, in chunks: a mask of the whole array would double a large float dataset.
    bad = np.concatenate([(~np.isfinite(x[i:i + chunk])).reshape(len(x[i:i + chunk]), -1)
                          .sum(1) for i in range(0, len(x), chunk)] or [np.zeros(0, int)])
    if bad.any():
      raise sources.DataCorrupt(
          f"{data.name}: {split} holds {int(bad.sum())} NaN or infinite value(s) in "
          f"{int((bad > 0).sum())} of {len(x)} images (the first: image "
          f"{int(np.argmax(bad > 0))}); they cannot be trained on or scored. Fix the data.")


def load_task_data(cfg) -> TaskData:
  """Load the task described by ``cfg`` (see the module docstring for the fields).

  Not run as a doctest: it loads Rotated MNIST (the TFDS data).

  >>> from types import SimpleNamespace                               # doctest: +SKIP
  >>> d = load_task_data(SimpleNamespace(name="rotated_mnist", test_domain=2))  # doctest: +SKIP
  >>> d.name, round(len(d.y_val) / (len(d.y_val) + d.num_train), 3)   # doctest: +SKIP
  ('Rotated MNIST (test domain 30°)', 0.2)
  """
  opts = _options(cfg)
  return _domain_task(opts) if opts.name in DOMAIN else _standard_task(opts)
