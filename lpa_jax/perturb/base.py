"""The perturbation interface: small NamedTuples of pure functions with explicit state.

Like optax transforms, every method is built by a factory and used through three functions:

* an :class:`ActivationMethod` owns the forward pass: it cuts the network at its point(s), adds
  ``δ`` there and returns the logits (and, for mixing methods, new targets);
* a :class:`LogitMethod` rewrites the training logits (and per-example loss weights), and may
  rewrite evaluation logits (post-hoc logit adjustment);
* gradient-level methods are ``optax.GradientTransformation`` s chained before the optimiser.

``refresh`` is called once per epoch, inside the jitted step, with the epoch's
:class:`~lpa_jax.perturb.classes.ClassStats`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpa_jax.perturb.classes import ClassStats
from lpa_jax.perturb.hooks import Cut, full_apply

PyTree = Any


class Context(NamedTuple):
  """Static facts about the run that perturbation factories may need."""
  num_classes: int
  class_counts: np.ndarray
  steps_per_epoch: int
  num_epochs: int
  cut_fn: Callable[[str], Cut]     # point name -> Cut
  points: tuple[str, ...]          # valid point names, bottom to top


class Batch(NamedTuple):
  x: jax.Array           # normalised, augmented inputs
  labels_B: jax.Array    # int labels (possibly noisy)
  targets_BxC: jax.Array  # soft targets (one-hot unless a method mixes)


class Forward(NamedTuple):
  logits_BxC: jax.Array
  targets_BxC: jax.Array
  model_state: dict
  aux: dict               # diagnostics; 'clean_logits' (if present) feeds the class statistics


class ActivationMethod(NamedTuple):
  init: Callable[[], PyTree]
  forward: Callable[[PyTree, dict, Batch, jax.Array, bool], Forward]
  refresh: Callable[[PyTree, ClassStats, jax.Array], PyTree]


class LogitMethod(NamedTuple):
  init: Callable[[], PyTree]
  apply: Callable[[PyTree, jax.Array, Batch, jax.Array], tuple[jax.Array, jax.Array, dict]]
  refresh: Callable[[PyTree, ClassStats, jax.Array], PyTree]
  predict: Callable[[PyTree, jax.Array], jax.Array] = lambda state, logits: logits


def keep_state(state, stats, epoch):
  return state


def plain_forward(cut: Cut) -> ActivationMethod:
  """No activation perturbation: the ordinary forward pass."""
  def forward(state, variables, batch, rng, train):
    logits, st = full_apply(cut, variables, batch.x, train)
    return Forward(logits, batch.targets_BxC, st, {})
  return ActivationMethod(lambda: (), forward, keep_state)


def identity_logits() -> LogitMethod:
  """No logit perturbation: unit weights."""
  def apply(state, logits_BxC, batch, step):
    return logits_BxC, jnp.ones(logits_BxC.shape[:1], logits_BxC.dtype), {}
  return LogitMethod(lambda: (), apply, keep_state)


def gather_rows(onehot_BxC: jax.Array, table_CxD: jax.Array) -> jax.Array:
  """``table[y]`` written as ``one_hot(y) @ table``, which shards cleanly over the batch axis."""
  flat = table_CxD.reshape(table_CxD.shape[0], -1)
  return (onehot_BxC @ flat).reshape(onehot_BxC.shape[:1] + table_CxD.shape[1:])


def per_class_mean(onehot_BxC: jax.Array, values_B: jax.Array) -> jax.Array:
  return (values_B @ onehot_BxC) / jnp.maximum(onehot_BxC.sum(0), 1.0)
