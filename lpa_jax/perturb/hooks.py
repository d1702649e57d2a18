"""Intervention hooks: cut a network at a named point into ``lower`` and ``upper`` halves.

A :class:`Cut` is the only thing the perturbation methods and the train step know about a
network.  Both halves are pure functions of the variables dict::

    act, state = cut.lower(variables, x, train)          # layers below the point, run once
    logits, state = cut.upper(variables, act, train)      # layers above it: what PGD re-runs

``upper`` never evaluates the layers below the point, so a PGD step costs only the FLOPs above
it.  ``state`` holds the mutated collections (``batch_stats``); ``upper`` must be given the
variables with ``lower``'s state merged in so that every BatchNorm is updated exactly once.

Three constructors cover three kinds of model:

* :func:`cut_staged` — lpa_jax's own models, through their named points;
* :func:`lpa_jax.perturb.foreign.cut_linen` — any Linen model, by module path, through
  ``nn.intercept_methods``;
* :func:`lpa_jax.perturb.foreign.cut_nnx` — any NNX model, by attribute path.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn

from lpa_jax.models.staged import check_point, depth_below_logits

Variables = dict[str, Any]


class Cut(NamedTuple):
  """A network split at ``point``; see the module docstring.

  Attributes:
    lower: ``(variables, x, train) -> (act, new_state)``.
    upper: ``(variables, act, train, extra) -> (logits, new_state)``; ``extra`` maps higher
      point names to per-example tensors added there (``None`` for none; only staged models).
    point: name of the cut point.
    depth: ``L - l``, the number of stages between the point and the logits.
    mutable: names of the collections a training-mode pass updates.
  """
  lower: Callable[..., tuple[Any, Variables]]
  upper: Callable[..., tuple[Any, Variables]]
  point: str
  depth: int
  mutable: tuple[str, ...] = ("batch_stats",)


def _mutable(variables: Variables, train: bool, names: Sequence[str]):
  present = [n for n in names if n in variables] if train else []
  return present or False  # Flax returns (out, state) for any non-False ``mutable``


def cut_staged(model: nn.Module, point: str) -> Cut:
  """Cuts one of lpa_jax's staged models at a named point.

  >>> cut = cut_staged(get_model("resnet32", 10), "stage3")
  >>> act, st = cut.lower(variables, x, True)
  >>> logits, st = cut.upper({**variables, **st}, act, True)
  """
  points = model.points
  check_point(point, points)
  names = ("batch_stats",)

  def lower(variables, x, train):
    mut = _mutable(variables, train, names)
    out = model.apply(variables, x, train=train, stop=point, mutable=mut)
    return out if mut else (out, {})

  def upper(variables, act, train, extra=None):
    if extra:
      for p in extra:
        check_point(p, points[points.index(point) + 1:], "extra point above " + point)
      variables = {**variables, "perturbations": extra}
    mut = _mutable(variables, train, names)
    if point == points[-1]:  # cut at the logits: nothing above
      return act, {}
    out = model.apply(variables, act, train=train, start=point, mutable=mut)
    return out if mut else (out, {})

  return Cut(lower, upper, point, depth_below_logits(points, point), names)


def full_apply(cut: Cut, variables: Variables, x, train: bool):
  """Plain forward pass through both halves; returns ``(logits, new_state)``."""
  act, st = cut.lower(variables, x, train)
  logits, st2 = cut.upper({**variables, **st}, act, train)
  return logits, {**st, **st2}
