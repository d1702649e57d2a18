"""Intervention hooks: cut a network at a named point into ``lower`` and ``upper`` halves.

A :class:`Cut` is the only thing the perturbation methods and the train step know about a
network.  Both halves are pure functions of the variables dict (and of an optional key)::

    act, state = cut.lower(variables, x, train, rng=key)       # layers below the point, once
    logits, state = cut.upper(variables, act, train, rng=key)  # layers above it: PGD re-runs

``upper`` never evaluates the layers below the point, so a PGD step costs only the FLOPs above
it.  ``state`` holds the mutated collections (``batch_stats``); ``upper`` must be given the
variables with ``lower``'s state merged in so that every BatchNorm is updated exactly once.

Randomness (dropout): in training mode a Linen model gets ``rngs={'dropout': rng}``.  Give
``lower`` and every ``upper`` call of one step the *same* key: Flax folds each module's path
(and a per-module call counter) into it, so every Dropout layer draws its own stream, and
``lower`` + ``upper`` draw exactly the masks of the model's own forward with that key.  The
repeated ``upper`` calls of PGD then see one fixed mask, the one the step's loss sees.  A
model that draws random numbers in training mode and gets no ``rng`` raises a ``ValueError``.

Three constructors cover three kinds of model:

* :func:`cut_staged` — lpa_jax's own models, through their named points;
* :func:`lpa_jax.perturb.foreign.cut_linen` — any Linen model, by module path, through
  ``nn.intercept_methods``;
* :func:`lpa_jax.perturb.foreign.cut_nnx` — any NNX model, by attribute path.
"""

from typing import Any, Callable, NamedTuple, Sequence

import flax.errors
import flax.linen as nn
import jax

from lpa_jax.models.staged import check_point

Variables = dict[str, Any]


class Cut(NamedTuple):
  """A network split at ``point``; see the module docstring.

  Attributes:
    lower: ``(variables, x, train, rng=None) -> (act, new_state)``.
    upper: ``(variables, act, train, extra=None, rng=None) -> (logits, new_state)``; ``extra``
      maps higher point names to per-example tensors added there (``None`` for none; only
      staged models); ``rng`` should be the key ``lower`` got.
    point: name of the cut point.
    mutable: names of the collections a training-mode pass updates.
  """
  lower: Callable[..., tuple[Any, Variables]]
  upper: Callable[..., tuple[Any, Variables]]
  point: str
  mutable: tuple[str, ...] = ("batch_stats",)


def _mutable(variables: Variables, train: bool, names: Sequence[str]):
  present = [n for n in names if n in variables] if train else []
  return present or False  # Flax returns (out, state) for any non-False ``mutable``


def linen_rngs(rng, train: bool, names: Sequence[str] = ("dropout",)) -> dict:
  """The ``rngs=`` of a Linen apply: ``rng`` for ``names[0]``, ``fold_in(rng, i)`` for the
  ``i``-th other name (Flax derives every stream from its key by module path only, so two
  names given one key would draw identical numbers); nothing in eval mode or without a key.

  >>> linen_rngs(jax.random.PRNGKey(0), True)
  {'dropout': Array([0, 0], dtype=uint32)}
  """
  if not train or rng is None:
    return {}
  return {n: rng if i == 0 else jax.random.fold_in(rng, i) for i, n in enumerate(names)}


def apply_linen(model: nn.Module, variables: Variables, *args, rngs: dict, **kwargs):
  """``model.apply`` whose missing-key error names the fix (the ``rng=`` of a cut's halves)."""
  try:
    return model.apply(variables, *args, rngs=rngs, **kwargs)
  except flax.errors.InvalidRngError as e:
    raise ValueError(f"{type(model).__name__} draws random numbers in training mode (e.g. "
                     f"nn.Dropout) but has no key for them ({e}): pass rng= to cut.lower and "
                     "cut.upper (the same key to both, e.g. the train step's per-step key), and "
                     "name streams other than 'dropout' in the cut's rng_names=") from e


def cut_staged(model: nn.Module, point: str, rng_names: Sequence[str] = ("dropout",)) -> Cut:
  """Cuts one of lpa_jax's staged models at a named point.

  ``rng_names``: the model's random streams, seeded from the halves' ``rng`` in train mode.

  >>> from lpa_jax.models import get_model
  >>> model = get_model("mlp", 3, widths=(8, 8))
  >>> x, key = jnp.ones((8, 2, 2, 1)), jax.random.key(0)
  >>> variables = model.init(key, x)
  >>> cut = cut_staged(model, "hidden1")
  >>> act, st = cut.lower(variables, x, True, rng=key)
  >>> logits, st = cut.upper({**variables, **st}, act, True, rng=key)
  >>> act.shape, logits.shape
  ((8, 8), (8, 3))
  """
  points = model.points
  check_point(point, points)
  names = ("batch_stats",)

  def lower(variables, x, train, rng=None):
    mut = _mutable(variables, train, names)
    out = apply_linen(model, variables, x, train=train, stop=point, mutable=mut,
                      rngs=linen_rngs(rng, train, rng_names))
    return out if mut else (out, {})

  def upper(variables, act, train, extra=None, rng=None):
    if extra:
      for p in extra:
        check_point(p, points[points.index(point) + 1:], "extra point above " + point)
      variables = {**variables, "perturbations": extra}
    mut = _mutable(variables, train, names)
    if point == points[-1]:  # cut at the logits: nothing above
      return act, {}
    out = apply_linen(model, variables, act, train=train, start=point, mutable=mut,
                      rngs=linen_rngs(rng, train, rng_names))
    return out if mut else (out, {})

  return Cut(lower, upper, point, names)


def full_apply(cut: Cut, variables: Variables, x, train: bool, rng=None):
  """Plain forward pass through both halves (one key for both); ``(logits, new_state)``.

  >>> from lpa_jax.models import get_model
  >>> model = get_model("mlp", 3, widths=(8, 8))
  >>> x, key = jnp.ones((8, 2, 2, 1)), jax.random.key(0)
  >>> variables = model.init(key, x)
  >>> logits, st = full_apply(cut_staged(model, "hidden2"), variables, x, True, rng=key)
  >>> bool(jnp.allclose(logits, model.apply(variables, x)))   # the model's own forward
  True
  """
  act, st = cut.lower(variables, x, train, rng=rng)
  logits, st2 = cut.upper({**variables, **st}, act, train, rng=rng)
  return logits, {**st, **st2}
