"""Networks written as stages, each stage boundary a named intervention point.

Every model in :mod:`lpa_jax.models` is a Linen module whose ``__call__`` takes
``start`` and ``stop`` point names, so that one network can be cut at any point:

>>> model = get_model("resnet32", num_classes=10)
>>> act = model.apply(variables, x, train=True, stop="stage3", mutable=["batch_stats"])[0]
>>> logits = model.apply(variables, act, train=True, start="stage3", mutable=["batch_stats"])[0]

Running from ``start`` never builds the layers below it, so it costs only the FLOPs above the
point.  At each point the activation is also routed through Linen's :meth:`Module.perturb`
(collection ``"perturbations"``), and sown into ``"intermediates"``, so the stock Flax
intervention tools work on these models unchanged.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

Layer = tuple[str, Callable[..., jnp.ndarray]]


def check_point(name: str | None, points: Sequence[str], what: str = "point") -> None:
  """Raises a ValueError listing the valid names when ``name`` is not one of ``points``."""
  if name is not None and name not in points:
    raise ValueError(
        f"Unknown intervention {what} {name!r}; valid points are: {', '.join(points)}")


def intervene(module: nn.Module, name: str, act: jnp.ndarray) -> jnp.ndarray:
  """Named intervention point: sow the activation and add any Flax perturbation given for it.

  Unlike a bare ``Module.perturb``, a ``perturbations`` collection may name only some points,
  and ``init`` creates none (so variables hold no batch-shaped zeros); get a zero template with
  ``model.apply(variables, x, mutable=["perturbations"])[1]``.
  """
  module.sow("intermediates", name, act)
  if module.is_initializing():
    return act
  if module.is_mutable_collection("perturbations") or module.has_variable("perturbations", name):
    act = module.perturb(name, act)
  return act


def run_stages(module: nn.Module, layers: Sequence[Layer], x, train: bool,
               start: str | None, stop: str | None):
  """Runs ``layers`` (name, fn(h, train)) from just above ``start`` up to and including ``stop``."""
  names = [n for n, _ in layers]
  check_point(start, names, "start")
  check_point(stop, names, "stop")
  lo = names.index(start) + 1 if start is not None else 0
  hi = names.index(stop) if stop is not None else len(names) - 1
  if lo > hi + 1:
    raise ValueError(f"start={start!r} lies above stop={stop!r}; points run {names}")
  h = x
  for name, fn in layers[lo:hi + 1]:
    h = intervene(module, name, fn(h, train))
  return h


def depth_below_logits(points: Sequence[str], point: str) -> int:
  """``L - l`` of the SPEC: the number of stages between ``point`` and the logits."""
  check_point(point, points)
  return len(points) - 1 - list(points).index(point)


class GlobalPool(nn.Module):
  """Optional BN-ReLU (pre-activation nets) then global average pooling to a feature vector."""
  bn_relu: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.bn_relu:
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return jnp.mean(x, axis=(1, 2))


def linear_head(num_classes: int):
  """The ``logits`` layer of every staged model (built lazily inside the parent's compact call)."""
  return lambda h, train: nn.Dense(num_classes, name="logits_layer")(h)
