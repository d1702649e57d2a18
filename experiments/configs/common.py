"""Shared config blocks.  Every task config starts from :func:`base_config`.

Perturbation methods each own a block under ``config.perturb.<name>``; the switches
``perturb.activation``, ``perturb.logit`` and ``perturb.gradient`` pick one method per level.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import ml_collections as mlc

from experiments.configs import methods


def base_config(split: str = "balanced") -> mlc.ConfigDict:
  """The shared skeleton; ``split`` is the task's class-split rule for class-level methods."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.data = mlc.ConfigDict(dict(
      name="fashion_mnist", data_dir=mlc.FieldReference(None, field_type=str),
      cache_dir=mlc.FieldReference(None, field_type=str), download=True,
      imbalance_ratio=1.0, n_max=mlc.FieldReference(None, field_type=int),
      test_subset=mlc.FieldReference(None, field_type=int), noise_type="none", noise_rate=0.0,
      test_domain=0, holdout_fraction=0.2, val_fraction=0.0, seed=0))
  # dtype: the compute dtype (bfloat16 = mixed precision, f32 parameters and statistics).
  c.model = mlc.ConfigDict(dict(name="cnn", kwargs=mlc.ConfigDict(dict(dtype="float32"))))
  c.optim = mlc.ConfigDict(dict(
      batch_size=128, num_epochs=10, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
      schedule="cosine", warmup_epochs=0.0, decay_epochs=(), decay_factors=()))
  # min/max_loss_change: the floor and the ceiling, in nats, for an activation method's
  # per-epoch mean |loss change| of the classes it perturbs (experiments.train.guards); None
  # switches one off (max_loss_change=inf on the command line).  Both are warned about and
  # recorded in results.json; an epoch above the ceiling stops the run when
  # max_loss_change_action is "stop".
  c.train = mlc.ConfigDict(dict(
      augment="none", eval_every=1, checkpoint_every=1,
      min_loss_change=mlc.FieldReference(0.05, field_type=float),
      max_loss_change=mlc.FieldReference(1.0, field_type=float),
      max_loss_change_action="warn"))
  c.perturb = mlc.ConfigDict(dict(activation="none", logit="none", gradient="none"))
  for name, block in methods.method_blocks(split).items():
    c.perturb[name] = block
  return c


def paper_protocol(c: mlc.ConfigDict, model: str) -> mlc.ConfigDict:
  """SPEC §4's balanced CIFAR protocol: ``model``, pad-4 crop + flip, batch 128, SGD momentum
  0.9, 200 epochs, lr 0.1 ÷10 at epochs 100 and 150 (weight decay stays the task's)."""
  c.model.name = model
  c.train.augment = "crop_flip"
  c.train.eval_every = 10
  c.optim.update(dict(batch_size=128, num_epochs=200, lr=0.1, schedule="step",
                      decay_epochs=(100, 150), decay_factors=(0.1, 0.01)))
  return c


AUGMENTS = ("none", "crop_flip")
# Sections whose numbers must all be finite (the perturb blocks are checked by the registry).
FINITE_SECTIONS = ("seed", "data", "model", "optim", "train")


class InvalidConfig(ValueError):
  """A config value is invalid; the message names the field."""


def validate(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """Rejects invalid values (:class:`InvalidConfig`) with a message naming the field.

  >>> from experiments.configs import longtail
  >>> c = longtail.get_config("quick"); c.optim.lr = float("inf")
  >>> validate(c)
  Traceback (most recent call last):
  experiments.configs.common.InvalidConfig: Invalid config value config.optim.lr=inf: must be ...
  """
  import jax

  from lpa_jax.models import DTYPES, MODELS
  from experiments import registry
  _check_finite(c)
  _check_model_kwargs(c.model)
  checks = [
      (c.optim.batch_size > 0, "optim.batch_size", "must be positive"),
      (c.optim.num_epochs > 0, "optim.num_epochs", "must be positive"),
      (c.optim.lr > 0, "optim.lr", "must be positive"),
      (0 <= c.optim.momentum < 1, "optim.momentum", "must lie in [0, 1)"),
      (c.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
      (c.train.augment in AUGMENTS, "train.augment", f"must be one of {AUGMENTS}"),
      (c.train.eval_every > 0, "train.eval_every", "must be positive"),
      (c.train.checkpoint_every > 0, "train.checkpoint_every", "must be positive"),
      (c.train.get("min_loss_change") is None or c.train.min_loss_change >= 0,
       "train.min_loss_change", "must be >= 0 nats, or None for no floor"),
      (c.train.get("max_loss_change") is None or c.train.max_loss_change > 0,
       "train.max_loss_change", "must be > 0 nats, or None / inf for no ceiling"),
      (c.train.get("max_loss_change_action", "warn") in ("warn", "stop"),
       "train.max_loss_change_action", "must be 'warn' or 'stop'"),
      (None in (c.train.get("min_loss_change"), c.train.get("max_loss_change"))
       or c.train.min_loss_change < c.train.max_loss_change, "train.max_loss_change",
       "must be above train.min_loss_change"),
      (c.model.name in MODELS, "model.name", f"must be one of {', '.join(MODELS)}"),
      (c.model.kwargs.get("dtype", "float32") in DTYPES, "model.kwargs.dtype",
       f"the compute dtype must be one of {', '.join(DTYPES)}"),
      (c.model.kwargs.get("dtype") != "float64" or jax.config.jax_enable_x64,
       "model.kwargs.dtype", "float64 needs 64-bit JAX, which is off (set JAX_ENABLE_X64=1)"),
      (c.data.imbalance_ratio >= 1, "data.imbalance_ratio", "must be >= 1 (1 = balanced)"),
      (0 <= c.data.noise_rate < 1, "data.noise_rate", "must lie in [0, 1)"),
  ]
  try:  # unknown names, a repeated logit method, NaN/inf hyper-parameters: name the field
    for _, name in registry.selected(c.perturb):
      registry.check_block(name, c.perturb[name])
  except ValueError as e:
    raise InvalidConfig(f"Invalid config: {e}") from None
  _check_data(c.data)
  if "ldam" in registry.logit_names(c.perturb.logit):
    # LDAM-DRW as published trains a normalised (cosine) classifier (Cao et al. 2019).
    head = c.model.kwargs.get("head", None)
    if head not in (None, "cosine"):
      raise InvalidConfig(f"Invalid config value config.model.kwargs.head={head!r}: "
                       "perturb.logit=ldam needs the normalised classifier head 'cosine'")
    c.model.kwargs.head = "cosine"
  for ok, field, why in checks:
    if not ok:
      raise InvalidConfig(f"Invalid config value config.{field}={_get(c, field)!r}: {why}")
  return c


def _leaves(node, prefix: str):
  """``(dotted field, value)`` of every leaf under ``node`` (tuple elements included)."""
  if isinstance(node, (dict, mlc.ConfigDict)):
    for k in node.keys():
      yield from _leaves(node[k], f"{prefix}.{k}")
  elif isinstance(node, (tuple, list)):
    for i, v in enumerate(node):
      yield from _leaves(v, f"{prefix}[{i}]")
  else:
    yield prefix, node


def _check_finite(c) -> None:
  for section in FINITE_SECTIONS:
    for field, v in _leaves(c[section], section):
      if field == "train.max_loss_change" and v == math.inf:
        continue  # the command line's way to say "no ceiling" (None does not parse as a float)
      if isinstance(v, float) and not math.isfinite(v):
        raise InvalidConfig(f"Invalid config value config.{field}={v!r}: must be a finite "
                            "number")


def _model_fields(name: str) -> dict:
  """``{field: default}`` of a registered model's constructor arguments."""
  from lpa_jax.models import MODELS
  factory = MODELS[name]
  cls = factory.func if isinstance(factory, functools.partial) else factory
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name", "num_classes")}


def _check_model_kwargs(model) -> None:
  """Every ``model.kwargs`` entry must be a field of the model, of the type of its default:
  widths a tuple of positive integers, depths and widening factors positive integers."""
  from lpa_jax.models import MODELS
  if model.name not in MODELS:
    return  # named by the check of model.name
  fields = _model_fields(model.name)
  for key in model.kwargs.keys():
    v, bad = model.kwargs[key], None
    if key not in fields:
      bad = f"{model.name} has no such argument; valid: {', '.join(sorted(fields))}"
    elif isinstance(fields[key], tuple):
      if not (isinstance(v, (tuple, list)) and v and all(_positive_int(w) for w in v)):
        bad = "must be a non-empty tuple of positive integers, e.g. (16, 32, 64)"
    elif isinstance(fields[key], int) and not isinstance(fields[key], bool):
      if not _positive_int(v):
        bad = "must be a positive integer"
    elif isinstance(fields[key], str) and not isinstance(v, str):
      bad = "must be a string"
    if bad:
      raise InvalidConfig(f"Invalid config value config.model.kwargs.{key}={v!r}: {bad}")


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_data(data) -> None:
  """The data loader's own checks (dataset name, ranges, combinations), before anything runs."""
  from experiments.data.task import check_options
  try:
    check_options(data)
  except (ValueError, TypeError, OverflowError) as e:
    raise InvalidConfig(f"Invalid config value: {e}") from None


def _get(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c
