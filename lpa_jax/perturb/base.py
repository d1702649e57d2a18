"""The perturbation interface: small NamedTuples of pure functions with explicit state.

Like optax transforms, every method is built by a factory and used through three functions:

* an :class:`ActivationMethod` owns the forward pass: it cuts the network at its point(s), adds
  ``δ`` there and returns the logits (and, for mixing methods, new targets);
* a :class:`LogitMethod` rewrites the training logits (and per-example loss weights), and may
  rewrite evaluation logits (post-hoc logit adjustment);
* a :class:`GradientMethod` bundles ``optax.GradientTransformation`` s placed around the
  optimiser (and, for LPG, a :class:`LogitMethod` whose custom backward edits logit gradients).

``refresh`` is called once per epoch, inside the jitted step, with the epoch's
:class:`~lpa_jax.perturb.classes.ClassStats`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


class GradientMethod(NamedTuple):
  """Where a gradient-level method acts; every field is optional.

  Attributes:
    pre: transform of the raw parameter gradients (clipping, noise, GAF on raw gradients).
    post: transform of the momentum output (GAF on momentum).
    needs_grad_fn: the optimiser's ``update`` wants ``grad_fn=`` (SAM in opaque mode).
    wrap: ``tx -> tx'`` wrapping the whole optimiser (SAM).
    logit: a :class:`LogitMethod` applied after the logit-level method (LPG's custom backward).
  """
  pre: Any = None
  post: Any = None
  needs_grad_fn: bool = False
  wrap: Callable | None = None
  logit: LogitMethod | None = None


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


def chain_logits(a: LogitMethod, b: LogitMethod) -> LogitMethod:
  """Applies ``a`` then ``b``: states as a tuple, weights multiplied, aux merged, predict chained.

  >>> m = chain_logits(logit_adjust(ctx), lpg(ctx))   # LA on the logits, LPG on their gradient
  >>> z, w_B, aux = m.apply(m.init(), z, batch, step)
  """
  def apply(state, logits_BxC, batch, step):
    z, w_a, aux_a = a.apply(state[0], logits_BxC, batch, step)
    z, w_b, aux_b = b.apply(state[1], z, batch, step)
    return z, w_a * w_b, {**aux_a, **aux_b}

  def refresh(state, stats, epoch):
    return a.refresh(state[0], stats, epoch), b.refresh(state[1], stats, epoch)

  def predict(state, logits_BxC):
    return b.predict(state[1], a.predict(state[0], logits_BxC))

  return LogitMethod(lambda: (a.init(), b.init()), apply, refresh, predict)


def sample_norms(a_BxD: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(a_BxD.reshape(a_BxD.shape[0], -1) ** 2, -1))


def perturbation_diagnostics(delta_BxD, act_BxD, onehot_BxC, clean_logits, logits, targets_BxC,
                             sign_C, clean_targets_BxC=None) -> dict:
  """Per-class diagnostics shared by every activation method (means over the batch's samples).

  ``delta_norm_C`` (mean ‖δ_i‖), ``sign_C``, ``expansive_share_C`` (share with ‖a+δ‖ > ‖a‖),
  ``loss_change_C`` (perturbed minus clean loss; the clean loss uses ``clean_targets_BxC``,
  default ``targets_BxC``), ``present_C``; plus ``clean_logits`` for the class statistics.
  For a class-level ``δ`` pass ``delta_BxD = gather_rows(onehot_BxC, δ_CxD)``.

  >>> aux = perturbation_diagnostics(d_BxD, a_BxD, onehot_BxC, z0_BxC, z_BxC, t_BxC, sign_C)
  """
  delta_BxD, act_BxD = jax.lax.stop_gradient((delta_BxD, act_BxD))
  clean_targets_BxC = targets_BxC if clean_targets_BxC is None else clean_targets_BxC
  expansive_B = (sample_norms(act_BxD + delta_BxD) > sample_norms(act_BxD)).astype(jnp.float32)
  dloss_B = (optax.softmax_cross_entropy(jax.lax.stop_gradient(logits), targets_BxC)
             - optax.softmax_cross_entropy(jax.lax.stop_gradient(clean_logits),
                                           clean_targets_BxC))
  return {
      "clean_logits": jax.lax.stop_gradient(clean_logits),
      "delta_norm_C": per_class_mean(onehot_BxC, sample_norms(delta_BxD)),
      "sign_C": jnp.asarray(sign_C, jnp.float32) * jnp.ones(onehot_BxC.shape[-1]),
      "expansive_share_C": per_class_mean(onehot_BxC, expansive_B),
      "loss_change_C": per_class_mean(onehot_BxC, dloss_B),
      "present_C": (onehot_BxC.sum(0) > 0).astype(jnp.float32),
  }


def gather_rows(onehot_BxC: jax.Array, table_CxD: jax.Array) -> jax.Array:
  """``table[y]`` written as ``one_hot(y) @ table``, which shards cleanly over the batch axis."""
  flat = table_CxD.reshape(table_CxD.shape[0], -1)
  return (onehot_BxC @ flat).reshape(onehot_BxC.shape[:1] + table_CxD.shape[1:])


def per_class_mean(onehot_BxC: jax.Array, values_B: jax.Array) -> jax.Array:
  return (values_B @ onehot_BxC) / jnp.maximum(onehot_BxC.sum(0), 1.0)
