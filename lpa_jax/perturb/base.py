"""The perturbation interfaces: small NamedTuples of pure functions with explicit state.

Like optax transforms, every method is built by a factory from its hyper-parameters and used
through pure functions:

* an :class:`ActivationMethod` transforms an activation: ``apply(state, act, labels, upper,
  rng, train) -> Perturbed`` gets the activation at its point, the labels and the network
  above the point as a function, and returns the new activation, the (possibly mixed) targets
  and its new state; ``train=False`` is the identity.  The caller owns the model and the
  lower/upper split (:func:`lpa_jax.perturb.place.perturbed_apply` does it for a ``Cut``);
* a :class:`LogitMethod` rewrites the training logits (and per-example loss weights), and may
  rewrite evaluation logits (post-hoc logit adjustment): ``apply(state, logits, batch, step)
  -> LogitOut(logits, weights_B, state, aux)``;
* gradient methods are plain ``optax.GradientTransformation`` s
  (:mod:`lpa_jax.perturb.gradient`), chained into the optimiser; LPG, which edits the logit
  gradients with a ``custom_vjp``, is a :class:`LogitMethod`.

Methods that split the classes (LPA, LPL, LPG) keep their split and the epoch's class
statistics in their own state (:class:`~lpa_jax.perturb.classes.SplitState`): ``apply`` adds
the batch's clean logits to them and returns the new state, and ``refresh(state)`` at the
epoch boundaries the caller chooses re-splits from them (``refresh(state, stats, epoch)``
takes statistics gathered elsewhere instead).
"""

import math
import numbers
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


PyTree = Any


def default_loss(logits_BxC: jax.Array, targets_BxC: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy: the loss PGD follows unless the caller passes its own."""
  return optax.softmax_cross_entropy(logits_BxC, targets_BxC)


def check_finite_params(method: str, **values) -> None:
  """Rejects NaN / inf hyper-parameters, naming the field (``lpa.eps must be finite ...``)."""
  for name, v in values.items():
    if v is None or isinstance(v, (str, bool)):
      continue
    arr = np.asarray(v, dtype=np.float64) if np.ndim(v) else None
    bad = (not np.all(np.isfinite(arr))) if arr is not None else not math.isfinite(float(v))
    if bad:
      raise ValueError(f"{method}.{name} must be finite, got {v!r}")


def check_num_classes(who: str, num_classes) -> int:
  """``num_classes`` as a positive int, else an error naming ``who``.

  >>> check_num_classes("lpl", 10)
  10
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
     or num_classes < 1:
    raise ValueError(f"{who}.num_classes must be a positive int, got {num_classes!r}")
  return int(num_classes)


def check_class_counts(who: str, class_counts, num_classes: int | None = None,
                       required: bool = True):
  """Checks ``class_counts`` (one finite, non-negative training count per class) and returns
  it unchanged; ``None`` is an error when ``required``.

  >>> check_class_counts("logit_adjust", [3, 2, 1]), check_class_counts("lpl", None, 3, False)
  ([3, 2, 1], None)
  """
  if class_counts is None:
    if required:
      raise ValueError(f"{who} needs class_counts, the training count of each class")
    return None
  counts = np.asarray(class_counts)
  if counts.ndim != 1 or counts.size == 0 or \
     (num_classes is not None and counts.shape != (num_classes,)):
    raise ValueError(f"{who}.class_counts must hold one training count per class: got shape "
                     f"{counts.shape}" + (f" for num_classes={num_classes}" if num_classes
                                          else ""))
  if not np.issubdtype(counts.dtype, np.number) or not np.all(np.isfinite(counts)) \
     or np.any(counts < 0):
    raise ValueError(f"{who}.class_counts must be finite counts >= 0, got {class_counts!r}")
  return class_counts


def check_labels(labels_B, num_classes: int, who: str, act=None) -> None:
  """Rejects labels a class table cannot index, naming ``who`` and the sizes.

  Shapes and dtype are checked always (they are static under ``jax.jit``); the values — every
  label in ``[0, num_classes)`` — only when they are concrete (outside ``jit``).  Inside
  ``jit`` the library's train step and :func:`~lpa_jax.perturb.diagnostics.
  perturbation_diagnostics` count them as ``invalid_labels``, which
  :func:`~lpa_jax.perturb.diagnostics.check_finite` turns into an error on the host.
  Checking never changes what is computed.

  >>> check_labels(jnp.array([0, 2]), 3, "lpa")
  >>> check_labels(jnp.array([1, 3]), 3, "lpa")
  Traceback (most recent call last):
  ValueError: lpa: labels must lie in [0, 3) (0-indexed class ids); got 1 outside it, e.g. 3
  """
  shape = getattr(labels_B, "shape", None)
  if shape is None or len(shape) != 1:
    raise ValueError(f"{who}: labels must be a 1-D vector of class ids, got shape {shape}")
  dtype = jnp.dtype(labels_B.dtype)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{who}: labels must be integer class ids, got dtype {dtype} (cast them "
                    "with labels.astype(jnp.int32); soft labels go in targets=)")
  if act is not None:
    batch = jax.tree.leaves(act)[0].shape[0]
    if shape[0] != batch:
      raise ValueError(f"{who}: labels has {shape[0]} entries but the activation has a batch "
                       f"of {batch}; they must match")
  if isinstance(labels_B, jax.core.Tracer):
    return
  values = np.asarray(labels_B)
  bad = values[(values < 0) | (values >= num_classes)]
  if bad.size:
    raise ValueError(f"{who}: labels must lie in [0, {num_classes}) (0-indexed class ids); got "
                     f"{bad.size} outside it, e.g. {bad[0]}")


def invalid_label_count(labels_B, num_classes: int) -> jax.Array:
  """How many labels lie outside ``[0, num_classes)`` (jittable; see :func:`check_labels`)."""
  return jnp.sum((labels_B < 0) | (labels_B >= num_classes)).astype(jnp.float32)


class Batch(NamedTuple):
  """A training batch as logit methods see it.

  ``clean_logits`` are the network's unperturbed logits, the ones class statistics are
  gathered from (an activation method's ``Forward.clean_logits``); ``None``: the logits the
  method is given.
  """
  x: jax.Array           # float inputs (augmented and normalised by the input pipeline)
  labels_B: jax.Array    # int labels (possibly noisy)
  targets_BxC: jax.Array  # soft targets (one-hot unless a method mixes)
  clean_logits: jax.Array | None = None


class Perturbed(NamedTuple):
  """What an activation method returns: the new activation, targets and state.

  ``clean_logits`` are the unperturbed logits when the method computed them anyway (LPA's PGD
  starts at δ = 0), else ``None``; ``extra`` maps higher point names to per-example tensors to
  add there (multi-layer LPA), else ``None``.
  """
  act: Any
  targets_BxC: jax.Array
  state: PyTree
  clean_logits: jax.Array | None = None
  aux: dict = {}
  extra: dict | None = None


class ActivationMethod(NamedTuple):
  """A transform of the activation at one point; see the module docstring."""
  init: Callable[[], PyTree]
  apply: Callable[..., Perturbed]
  refresh: Callable[..., PyTree]


class Forward(NamedTuple):
  """A placed method's forward pass: logits, targets, model and method state, diagnostics."""
  logits_BxC: jax.Array
  targets_BxC: jax.Array
  model_state: dict
  state: PyTree
  clean_logits: jax.Array | None
  aux: dict


class Placed(NamedTuple):
  """An activation method bound to a network: what the train step runs.

  ``forward(state, variables, batch, rng, train, loss_fn=None) -> Forward``.  Single-point
  methods are placed with :func:`lpa_jax.perturb.place.place`; methods that choose among
  several points (Manifold Mixup, adaptive-layer LPA) are built placed.
  """
  init: Callable[[], PyTree]
  forward: Callable[..., Forward]
  refresh: Callable[..., PyTree]


class LogitOut(NamedTuple):
  """What a logit method's ``apply`` returns: the logits to train on, per-example loss weights,
  the method's new state and its diagnostics."""
  logits_BxC: jax.Array
  weights_B: jax.Array
  state: PyTree
  aux: dict = {}


class LogitMethod(NamedTuple):
  """``apply(state, logits, batch, step) -> LogitOut``; ``refresh(state, stats=None,
  epoch=None) -> state``; ``predict(state, logits) -> logits`` at evaluation.

  ``pgd_apply`` is the same map as seen by an activation method's PGD (default: ``apply``);
  gradient-level edits that leave the loss unchanged (LPG's custom backward) set it to skip
  themselves, since PGD follows the training *loss*.
  """
  init: Callable[[], PyTree]
  apply: Callable[[PyTree, jax.Array, Batch, jax.Array], LogitOut]
  refresh: Callable[..., PyTree]
  predict: Callable[[PyTree, jax.Array], jax.Array] = lambda state, logits: logits
  pgd_apply: Callable | None = None


def keep_state(state, stats=None, epoch=None):
  return state


def identity() -> ActivationMethod:
  """No activation perturbation: ``act`` unchanged, empty state.

  >>> out = perturbed_apply(identity(), cut, (), variables, x, y)   # the plain forward
  """
  def apply(state, act, labels_B, upper, rng=None, train=True, *, loss_fn=None, targets=None):
    return Perturbed(act, targets, state)
  return ActivationMethod(lambda: (), apply, keep_state)


def unit_weights(logits_BxC: jax.Array) -> jax.Array:
  return jnp.ones(logits_BxC.shape[:1], logits_BxC.dtype)


def identity_logits() -> LogitMethod:
  """No logit perturbation: unit weights.

  >>> out = identity_logits().apply((), logits, batch, step)   # out.logits_BxC is logits
  """
  def apply(state, logits_BxC, batch, step):
    return LogitOut(logits_BxC, unit_weights(logits_BxC), state)
  return LogitMethod(lambda: (), apply, keep_state)


def _check_members(methods) -> None:
  for i, m in enumerate(methods):
    if not isinstance(m, LogitMethod):
      hint = (": gradient transforms go into the optimiser, e.g. optax.chain(gaf(), "
              "optax.sgd(0.1))" if isinstance(m, optax.GradientTransformation) else "")
      raise TypeError(f"chain: argument {i} is a {type(m).__name__}, not a LogitMethod{hint}")


def _chained(fns) -> Callable:
  """``apply`` of members ``fns`` in order: weights multiplied, states a tuple, aux merged
  (clashes refused)."""
  def apply(state, logits_BxC, batch, step):
    if batch.clean_logits is None:  # class statistics read the chain's input, not a member's
      batch = batch._replace(clean_logits=jax.lax.stop_gradient(logits_BxC))
    z, w_B, aux, owner, states = logits_BxC, None, {}, {}, []
    for i, (fn, s) in enumerate(zip(fns, state)):
      out = fn(s, z, batch, step)
      z, w_B = out.logits_BxC, out.weights_B if w_B is None else w_B * out.weights_B
      states.append(out.state)
      for key in out.aux:
        if key in owner:
          raise ValueError(f"chain: methods {owner[key]} and {i} both report aux {key!r}; "
                           "chain methods whose aux keys differ")
        owner[key] = i
      aux.update(out.aux)
    return LogitOut(z, w_B, tuple(states), aux)
  return apply


def chain(*methods: LogitMethod) -> LogitMethod:
  """Applies logit methods in the order given, like ``optax.chain``.

  The state is the tuple of the members' states; ``apply`` feeds each member the logits the
  previous one returned (and the batch's clean logits, for class statistics), multiplies
  their weights, collects their new states and merges their aux (two members reporting the
  same aux key raise); ``refresh``, ``predict`` and ``pgd_apply`` are chained in the same
  order.  ``chain()`` is :func:`identity_logits` and ``chain(m)`` is ``m``.

  >>> la = logit_adjust(counts, tau=1.0)
  >>> m = chain(la, lpl(10, class_counts=counts, split="longtail"), lpg_logits(10))
  >>> out = m.apply(m.init(), z, batch, step)   # LA, then LPL, then LPG's backward
  >>> z, w_B, state = out.logits_BxC, out.weights_B, out.state
  """
  _check_members(methods)
  if not methods:
    return identity_logits()
  if len(methods) == 1:
    return methods[0]

  def init():
    return tuple(m.init() for m in methods)

  def refresh(state, stats=None, epoch=None):
    return tuple(m.refresh(s, stats, epoch) for m, s in zip(methods, state))

  def predict(state, logits_BxC):
    for m, s in zip(methods, state):
      logits_BxC = m.predict(s, logits_BxC)
    return logits_BxC

  return LogitMethod(init, _chained([m.apply for m in methods]), refresh, predict,
                     _chained([m.pgd_apply or m.apply for m in methods]))


def chain_logits(a: LogitMethod, b: LogitMethod) -> LogitMethod:
  """Deprecated: ``chain(a, b)``."""
  warnings.warn("chain_logits(a, b) is deprecated; use lpa_jax.perturb.chain(a, b, ...)",
                DeprecationWarning, stacklevel=2)
  return chain(a, b)


def pgd_loss_of(logit: LogitMethod, state, batch: Batch, step) -> Callable:
  """The training loss as PGD must follow it: ``(logits, targets) -> w_B · ℓ(logit(z), t)``.

  >>> m = ldam(counts, normalized_head=True, drw_start_step=1600)
  >>> loss_fn = pgd_loss_of(m, (), batch, step)   # LDAM margins and DRW weights
  """
  fn = logit.pgd_apply or logit.apply

  def loss_fn(logits_BxC, targets_BxC):
    out = fn(state, logits_BxC, batch._replace(targets_BxC=targets_BxC), step)
    return out.weights_B * default_loss(out.logits_BxC, targets_BxC)
  return loss_fn
