"""One protocol for every perturbation, like optax's ``GradientTransformationExtraArgs``.

Every method is a :class:`Perturbation`, built by a factory from hyper-parameters alone and
used through three pure functions with an explicit state::

    state = p.init()
    out = p.apply(state, x, labels=labels_B, **extra)   # -> Out(x, state, ...)
    state = p.refresh(out.state)                         # at the epoch boundaries you choose

``x`` is what the method's ``level`` perturbs, and ``apply`` takes the rest by name, ignoring
what it does not use (optax's ``extra_args``):

* ``"activation"`` — ``x`` is the activation at a point; ``upper`` (the layers above it, as a
  function of the activation), ``rng``, ``train``, ``loss_fn`` (the loss PGD follows) and
  ``targets``.  ``Out.x`` is the new activation.
* ``"logit"`` — ``x`` is the logits; ``targets``, ``step`` and ``clean_logits`` (the
  unperturbed logits class statistics are read from).  ``Out.x`` is the logits to train on and
  ``Out.weights_B`` the per-example loss weights.  ``predict(state, logits)`` is the
  evaluation-time map (post-hoc logit adjustment).
* ``"network"`` — methods that use several points (Manifold Mixup, adaptive LPA) and so run
  the network themselves: ``x`` is the input and ``variables`` the model's variables.
  ``Out.x`` is the logits and ``Out.model_state`` the new BatchNorm statistics.

:func:`chain` composes any mix of levels in order (at most one activation or network member,
first, then logit members); :func:`lpa_jax.perturb.place.perturbed_apply` runs a perturbation
(or a chain) inside a network cut at its point and returns the training loss, so PGD at the
point follows the loss the logit members after it define.  Gradient methods are optax
transforms, chained into the optimiser.

Methods that split the classes (LPA, LPL, LPG) keep their split and the epoch's class
statistics in their own state (:class:`~lpa_jax.perturb.classes.SplitState`): ``apply`` adds
the batch's clean logits to them, and ``refresh(state)`` re-splits from them
(``refresh(state, stats, epoch)`` takes statistics gathered elsewhere instead).
"""

import math
import numbers
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
  """A training batch as logit methods see it inside (internal: ``apply`` takes the fields by
  name).  ``clean_logits``: the unperturbed logits class statistics are read from."""
  x: jax.Array | None
  labels_B: jax.Array
  targets_BxC: jax.Array
  clean_logits: jax.Array | None = None


class Out(NamedTuple):
  """What every ``apply`` (and :func:`~lpa_jax.perturb.place.perturbed_apply`) returns.

  Attributes:
    x: the perturbed input of the level: the new activation (activation level) or the logits
      to train on (logit and network levels, and :func:`perturbed_apply`).
    state: the method's new state.
    targets_BxC: the (possibly mixed) soft targets.
    weights_B: per-example loss weights (``None``: all ones).
    clean_logits: the unperturbed logits, when known (LPA's PGD starts at ``δ = 0``).
    aux: diagnostics (per-class ``‖δ_c‖``, loss change, sign, ...).
    extra: per-example tensors to add at higher points (multi-layer LPA), else ``None``.
    model_state: the model's new mutable collections (network level, ``perturbed_apply``).
    loss: the weighted training loss (``perturbed_apply`` only).
  """
  x: Any
  state: PyTree
  targets_BxC: jax.Array | None = None
  weights_B: jax.Array | None = None
  clean_logits: jax.Array | None = None
  aux: dict = {}
  extra: dict | None = None
  model_state: dict = {}
  loss: jax.Array | None = None

  @property
  def logits_BxC(self):
    """``x``, named for the levels where it holds logits."""
    return self.x


def keep_state(state, stats=None, epoch=None):
  """``refresh`` of a method without class statistics: the state unchanged."""
  return state


def keep_logits(state, logits_BxC):
  """``predict`` of a method that leaves evaluation logits alone."""
  return logits_BxC


LEVELS = ("activation", "logit", "network", "chain")
# The named inputs any level's ``apply`` may be given (optax's ``extra_args``): a method ignores
# the ones it does not use, and refuses a name outside this set (a misspelt ``loss_fun=``).
EXTRA_INPUTS = frozenset({"labels", "upper", "rng", "train", "loss_fn", "targets", "step",
                          "clean_logits", "variables", "extra_shapes"})


def check_extra(who: str, extra: dict) -> None:
  """Refuses named inputs no level takes, listing the valid ones.

  >>> check_extra("lpa", {"step": 3})
  >>> check_extra("lpa", {"loss_fun": None})  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  TypeError: lpa.apply() got an unexpected keyword argument 'loss_fun'; the named inputs ...
  """
  bad = sorted(set(extra) - EXTRA_INPUTS)
  if bad:
    raise TypeError(f"{who}.apply() got an unexpected keyword argument {bad[0]!r}; the named "
                    f"inputs are: {', '.join(sorted(EXTRA_INPUTS))}")


class Perturbation(NamedTuple):
  """A perturbation: ``init``, ``apply``, ``refresh`` (see the module docstring).

  Attributes:
    init: ``() -> state``.
    apply: ``(state, x, *, labels, **extra) -> Out``.
    refresh: ``(state, stats=None, epoch=None) -> state``.
    level: ``'activation'``, ``'logit'``, ``'network'``, or ``'chain'`` (a :func:`chain`
      holding an activation or network member; run it with ``perturbed_apply``).
    predict: ``(state, logits) -> logits`` at evaluation (logit level; identity elsewhere).
    loss_apply: the map PGD sees, when it differs from ``apply`` (LPG edits gradients only,
      so PGD, which follows the training *loss*, skips it); ``None``: ``apply``.
    members: a chain's members, in order.
    info: method-specific extras (LPA: ``delta``, ``radii``, ``accumulate``,
      ``extra_points``).
  """
  init: Callable[[], PyTree]
  apply: Callable[..., Out]
  refresh: Callable[..., PyTree]
  level: str = "activation"
  predict: Callable[[PyTree, jax.Array], jax.Array] = keep_logits
  loss_apply: Callable[..., Out] | None = None
  members: tuple = ()
  info: dict = {}


def unit_weights(logits_BxC: jax.Array) -> jax.Array:
  return jnp.ones(logits_BxC.shape[:1], logits_BxC.dtype)


def identity() -> Perturbation:
  """No perturbation: ``x`` unchanged, empty state (at any level).

  >>> p = identity()
  >>> p.apply(p.init(), jnp.ones((2, 3)), labels=jnp.array([0, 1])).x.shape
  (2, 3)
  """
  def apply(state, x, *, labels=None, targets=None, **extra):
    check_extra("identity", extra)
    return Out(x, state, targets)
  return Perturbation(lambda: (), apply, keep_state, "logit", info={"identity": True})


def logit_method(init, apply_batch, refresh=keep_state, predict=keep_logits,
                 loss_batch=None) -> Perturbation:
  """A logit-level :class:`Perturbation` from ``apply_batch(state, logits, batch, step) ->
  Out`` (the form logit methods are written in: the batch's labels, targets and clean logits
  in one :class:`Batch`); ``loss_batch`` likewise for ``loss_apply``.

  >>> p = logit_method(lambda: (), lambda s, z, b, t: Out(z + 1.0, s, b.targets_BxC))
  >>> p.apply((), jnp.zeros((1, 2)), labels=jnp.array([0])).x
  Array([[1., 1.]], dtype=float32)
  """
  def wrap(fn):
    def apply(state, x, *, labels, targets=None, step=0, clean_logits=None, **extra):
      check_extra("logit method", extra)
      if targets is None:
        targets = jax.nn.one_hot(labels, x.shape[-1], dtype=jnp.float32)
      out = fn(state, x, Batch(None, labels, targets, clean_logits), step)
      return out._replace(targets_BxC=targets) if out.targets_BxC is None else out
    return apply
  return Perturbation(init, wrap(apply_batch), refresh, "logit", predict,
                      None if loss_batch is None else wrap(loss_batch))


def _check_members(members) -> None:
  for i, m in enumerate(members):
    if isinstance(m, optax.GradientTransformation):
      raise TypeError(f"chain: argument {i} is an optax gradient transformation: gradient "
                      "methods go into the optimiser, e.g. optax.chain(gaf(), optax.sgd(0.1))")
    if not isinstance(m, Perturbation) or m.level not in LEVELS:
      raise TypeError(f"chain: argument {i} is a {type(m).__name__}, not a Perturbation")
  first_logit = next((i for i, m in enumerate(members) if m.level == "logit"), len(members))
  inner = [i for i, m in enumerate(members) if m.level != "logit"]
  if len(inner) > 1:
    raise ValueError(f"chain: members {inner} are all activation-level: one activation method "
                     "per chain (several points: lpa(..., extra_points=) or manifold_mixup)")
  if inner and inner[0] > first_logit:
    raise ValueError(f"chain: the activation-level member {inner[0]} comes after logit member "
                     f"{first_logit}; put it first (the logits exist only above its point)")


def _merge_aux(aux: dict, owner: dict, i: int, new: dict) -> None:
  for key in new:
    if key in owner:
      raise ValueError(f"chain: members {owner[key]} and {i} both report aux {key!r}; chain "
                       "methods whose aux keys differ")
    owner[key] = i
  aux.update(new)


def _chained(members, loss: bool = False) -> Callable:
  """``apply`` of logit members in order: weights multiplied, states a tuple, aux merged."""
  def apply(state, x, *, labels, targets=None, step=0, clean_logits=None, **extra):
    check_extra("chain", extra)
    if clean_logits is None:  # class statistics read the chain's input, not a member's
      clean_logits = jax.lax.stop_gradient(x)
    if targets is None:
      targets = jax.nn.one_hot(labels, x.shape[-1], dtype=jnp.float32)
    z, w_B, aux, owner, states = x, None, {}, {}, []
    for i, (m, s) in enumerate(zip(members, state)):
      fn = (m.loss_apply or m.apply) if loss else m.apply
      out = fn(s, z, labels=labels, targets=targets, step=step, clean_logits=clean_logits,
               **extra)
      z = out.x
      if out.weights_B is not None:
        w_B = out.weights_B if w_B is None else w_B * out.weights_B
      states.append(out.state)
      _merge_aux(aux, owner, i, out.aux)
    return Out(z, tuple(states), targets, w_B, clean_logits, aux)
  return apply


def _mixed_apply(state, x, **extra):
  raise TypeError("this chain holds an activation-level member, which runs inside the "
                  "network: call perturbed_apply(chain, cut, state, variables, x, labels, "
                  "rng) instead of chain.apply")


def chain(*members: Perturbation) -> Perturbation:
  """Composes perturbations in order, like ``optax.chain``: at most one activation (or
  network) member, first, then logit members.

  The state is the tuple of the members' states; ``refresh`` and ``predict`` run the members
  in order.  A chain of logit members is itself a logit perturbation: ``apply`` feeds each
  member the logits the previous one returned (class statistics read the chain's input),
  multiplies their weights and merges their aux (a key two members report is refused).  A
  chain with an activation member runs through
  :func:`~lpa_jax.perturb.place.perturbed_apply`, whose PGD follows the loss of the logit
  members after it.  ``chain()`` is :func:`identity` and ``chain(p)`` is ``p``.

  >>> from lpa_jax.perturb import logit_adjust, lpl
  >>> counts = [500, 50, 5]
  >>> p = chain(logit_adjust(counts), lpl(3, split="longtail", class_counts=counts))
  >>> logits, y = jnp.zeros((2, 3)), jnp.array([0, 2])
  >>> out = jax.jit(p.apply)(p.init(), logits, labels=y, step=0)   # Out(x=logits to train on...)
  >>> out.x.shape, len(out.state)
  ((2, 3), 2)
  """
  _check_members(members)
  if not members:
    return identity()
  if len(members) == 1:
    return members[0]

  def init():
    return tuple(m.init() for m in members)

  def refresh(state, stats=None, epoch=None):
    return tuple(m.refresh(s, stats, epoch) for m, s in zip(members, state))

  def predict(state, logits_BxC):
    for m, s in zip(members, state):
      logits_BxC = m.predict(s, logits_BxC)
    return logits_BxC

  if all(m.level == "logit" for m in members):
    return Perturbation(init, _chained(members), refresh, "logit", predict,
                        _chained(members, loss=True), members)
  return Perturbation(init, _mixed_apply, refresh, "chain", predict, None, members)


def split_chain(p: Perturbation, state):
  """``(inner, inner_state, logit, logit_state)`` of a perturbation: its activation or
  network member (``None`` if it has none) and the logit chain after it."""
  if p.level == "logit":
    return None, (), p, state
  if p.level != "chain":
    return p, state, identity(), ()
  rest = p.members[1:]
  logit = rest[0] if len(rest) == 1 else chain(*rest)
  return p.members[0], state[0], logit, (state[1] if len(rest) == 1 else tuple(state[1:]))


def join_state(p: Perturbation, inner_state, logit_state):
  """The inverse of :func:`split_chain` for the new states."""
  if p.level == "logit":
    return logit_state
  if p.level != "chain":
    return inner_state
  rest = p.members[1:]
  return (inner_state, logit_state) if len(rest) == 1 else (inner_state, *logit_state)


def pgd_loss_of(logit: Perturbation, state, labels_B, targets_BxC, step) -> Callable:
  """The training loss as PGD must follow it: ``(logits, targets) -> w_B · ℓ(logit(z), t)``
  (used by :func:`~lpa_jax.perturb.place.perturbed_apply`; no user code needs it).

  >>> from lpa_jax.perturb import ldam
  >>> y = jnp.array([0, 1])
  >>> t = jax.nn.one_hot(y, 2)
  >>> loss_fn = pgd_loss_of(ldam([90, 10], normalized_head=True, drw=False), (), y, t, 0)
  >>> np.asarray(loss_fn(jnp.zeros((2, 2)), t)).round(2)   # the rare class's margin is larger
  array([ 8.66, 15.  ], dtype=float32)
  """
  fn = logit.loss_apply or logit.apply

  def loss_fn(logits_BxC, targets):
    out = fn(state, logits_BxC, labels=labels_B, targets=targets, step=step)
    loss_B = default_loss(out.x, targets)
    return loss_B if out.weights_B is None else out.weights_B * loss_B
  return loss_fn
