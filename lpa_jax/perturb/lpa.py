"""LPA — Learning to Perturb Activations (SPEC §1), as a transform of an activation.

At one named point a class-level vector ``δ_{y_i}`` is added to every sample's activation.
``δ`` is found afresh for each mini-batch by ``T`` steps of PGD through the layers above the
point only — ascending the training loss for positive (hard / rare) classes, descending it for
negative (easy / frequent) ones — and then held constant for the training loss.

Built from hyper-parameters alone, used through pure, jittable functions (like optax)::

    method = lpa(num_classes=10, split="longtail", class_counts=counts, eps=0.5,
                 radius_mode="relative")
    state = method.init()
    delta_CxD = method.delta(state, upper, act, labels)     # PGD through `upper` only
    act = add_delta(act, delta_CxD, labels)                  # act + δ[y]
    out = method.apply(state, act, labels, upper, rng)       # both, plus stats and diagnostics
    state = method.refresh(out.state)                        # at an epoch boundary you choose

``upper(act) -> logits`` is the network above the point (with frozen parameters: PGD never
produces parameter gradients).  PGD ascends/descends ``loss_fn(logits, targets) -> loss_B``,
the loss the caller trains with (default softmax cross-entropy); a composed logit method's
loss (LDAM margins, logit adjustment, LPL) and per-example weights go in through ``loss_fn``.

The class gradient ``g_c = (1/N_c) Σ_{i∈S_c} ∂ℓ/∂a_i`` is the gradient of the batch's summed
loss with respect to ``δ_c``, over ``N_c``: one backward pass per step.  Where nothing above
the point couples the samples of a batch it equals the SPEC's per-sample sum; with a
training-mode BatchNorm above the point it also counts how class ``c``'s shift moves the other
samples' losses through the batch statistics (the literal per-sample form would need a
backward pass per example).
"""

import functools
import numbers
import warnings
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from lpa_jax.perturb import classes
from lpa_jax.perturb.base import (Perturbed, check_class_counts, check_finite_params,
                                  check_labels, check_num_classes, default_loss)
from lpa_jax.perturb.pgd import class_pgd
from lpa_jax.perturb.tables import class_counts as batch_counts
from lpa_jax.perturb.tables import gather_rows, per_class_mean, row_norms

RADIUS_MODES = ("absolute", "relative")
MAIN = "act"  # key of the perturbed point's table among the (multi-layer) tables


# LPA's state: its class split and this epoch's running class statistics (the state every
# class-level method keeps, :class:`~lpa_jax.perturb.classes.SplitState`).
LPAState = classes.SplitState


class LPA(NamedTuple):
  """LPA's pure functions; ``init``/``apply``/``refresh`` are the activation-method interface.

  Attributes:
    init: ``() -> LPAState``.
    apply: ``(state, act, labels, upper, rng=None, train=True, *, loss_fn=None, targets=None,
      extra_shapes=None) -> Perturbed``: ``δ`` by PGD, added to ``act``; the returned state has
      the batch's clean statistics accumulated.  ``train=False`` is the identity.
    refresh: ``(state, stats=None, epoch=None) -> state``: a new split from ``stats`` (default:
      the state's own accumulated statistics), statistics reset.
    delta: ``(state, upper, act, labels, *, loss_fn=None, targets=None) -> δ_CxD``.
    accumulate: ``(state, clean_logits, labels) -> state``.
    radii: ``(state, act, labels) -> ε_C`` at the main point.
    extra_points: names of higher points perturbed jointly (multi-layer variant).
  """
  init: Callable
  apply: Callable
  refresh: Callable
  delta: Callable
  accumulate: Callable
  radii: Callable
  extra_points: tuple = ()


def add_delta(act_BxD: jax.Array, delta_CxD: jax.Array, labels_B: jax.Array) -> jax.Array:
  """``act + δ[y]`` in the activation's dtype (a bf16 network stays bf16 above the point).

  >>> add_delta(jnp.zeros((2, 3)), jnp.eye(3), jnp.array([2, 0]))
  Array([[0., 0., 1.],
         [1., 0., 0.]], dtype=float32)
  """
  return act_BxD + gather_rows(delta_CxD, labels_B).astype(act_BxD.dtype)


def _validate(steps, eps, delta_eps, beta, radius_mode, depth, varied, lowrank):
  for name, v in (("eps", eps), ("delta_eps", delta_eps), ("beta", beta), ("depth", depth),
                  ("lowrank", lowrank)):
    check_finite_params("lpa", **{name: v})
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"lpa.steps (PGD steps T) must be an integer >= 1, got {steps!r}")
  if eps < 0 or delta_eps < 0 or not 0 < beta <= 1:
    raise ValueError(f"lpa needs eps >= 0, delta_eps >= 0 and 0 < beta <= 1; got eps={eps}, "
                     f"delta_eps={delta_eps}, beta={beta}")
  if eps == 0 and (not varied or delta_eps == 0):
    # A warning, not an error: radius 0 is the plain forward, a useful check of its own (a
    # config run selecting it is refused, registry.check_not_null).
    warnings.warn(f"lpa with eps=0 and {'varied=False' if not varied else 'delta_eps=0'} has "
                  "radius 0 for every class: it perturbs nothing (the plain forward); set "
                  "eps > 0", UserWarning, stacklevel=3)
  if depth < 0:
    raise ValueError(f"lpa.depth (L − l, the stages between the point and the logits) must be "
                     f">= 0, got {depth}: a negative depth would enlarge the radius by β^(L−l)")
  if lowrank is not None and not 0 < lowrank <= 1:
    raise ValueError(f"lpa.lowrank (the top-k fraction of directions kept) must lie in (0, 1], "
                     f"got {lowrank!r}; None turns the low-rank variant off")
  if radius_mode not in RADIUS_MODES:
    raise ValueError(f"lpa.radius_mode must be one of {RADIUS_MODES}, got {radius_mode!r}")


class LPAConfig(NamedTuple):
  """LPA's hyper-parameters (see :func:`lpa`); ``depths`` maps each perturbed point to ``L−l``."""
  num_classes: int
  split: str
  eps: float
  delta_eps: float
  beta: float
  steps: int
  varied: bool
  normalize: bool
  lowrank: float | None
  radius_mode: str
  depths: dict


def lpa(num_classes: int, split: str = "balanced", eps: float = 0.1, delta_eps: float = 0.1,
        beta: float = 0.7, steps: int = 3, varied: bool = True, normalize: bool = True,
        lowrank: float | None = None, radius_mode: str = "absolute", depth: float = 0,
        class_counts=None, num_head: int | None = None, signs=None,
        extra_points: Mapping[str, float] | None = None) -> LPA:
  """Builds LPA from its hyper-parameters.

  Every function taking ``labels`` wants integer class ids in ``[0, num_classes)``, one per
  example of ``act``; anything else raises, naming the sizes (the range is checked where the
  labels are concrete; under ``jit`` see :func:`~lpa_jax.perturb.base.check_labels`: there an
  out-of-range label gets ``δ = 0`` and counts towards no class's δ or statistics).

  Args:
    num_classes: ``C``, also the number of logits the layers above the point return.
    split: ``balanced`` / ``balanced_accuracy`` (q_c vs its mean, refreshed each epoch),
      ``longtail`` (frequency rank; needs ``class_counts``), ``all_positive`` (domain
      generalisation), ``all_negative``, or ``signs`` (a user-given vector ``signs``).
      The balanced rules have no split until the first ``refresh``: every sign is 0, so
      ``δ = 0`` through the first epoch (``state.split_ready`` and ``aux['split_ready']`` are
      0 until then); call ``refresh`` with statistics, or pick a rule with a fixed split.
    eps, delta_eps, beta, varied: radius ``β^(L−l)(ε + Δε|τ − q_c|)``, or ``β^(L−l)ε`` if fixed.
    steps: PGD steps ``T``; step size ``2ε_c/T``.
    normalize: normalised PGD step (ours) or the paper's raw gradient step.
    lowrank: top-k fraction for the low-rank gradient variant (``0.25`` = ``k = d/4``).
    radius_mode: ``absolute`` ℓ2 radius, or ``relative`` to the class's mean activation norm
      in the batch (ours: ``ε`` is then a fraction of ``‖a‖``).
    depth: ``L − l`` of the point, for ``β^(L−l)`` (the one place it is set: a cut does not
      carry it; ``cut_staged(...).depth`` tells it for lpa_jax's own models).
    class_counts: training examples per class (long-tail split), ``num_classes`` of them.
    num_head: head size of the long-tail split; default :func:`classes.median_num_head`, the
      SPEC's rule (classes with a below-median count are P). A config run shares one head
      with LPL and LPG instead (:func:`classes.run_num_head`, ``round(0.4·C)`` unless set).
    extra_points: ``{name: depth}`` of higher points perturbed jointly (multi-layer variant;
      the network's ``upper(act, extra)`` must accept per-example tensors there).

  >>> method = lpa(10, split="all_positive", eps=0.5)
  >>> out = method.apply(method.init(), act_BxD, labels_B, upper, None)
  """
  num_classes = check_num_classes("lpa", num_classes)
  check_class_counts("lpa", class_counts, num_classes, required=False)
  _validate(steps, eps, delta_eps, beta, radius_mode, depth, varied, lowrank)
  extra_points = dict(extra_points or {})
  for p, d in extra_points.items():
    check_finite_params("lpa", **{f"extra_points[{p}]": d})
  if num_head is None and split == "longtail" and class_counts is not None:
    num_head = classes.median_num_head(class_counts)
  init_split = classes.initial_split(split, num_classes, class_counts, signs, num_head)
  cfg = LPAConfig(num_classes, split, eps, delta_eps, beta, steps, varied, normalize, lowrank,
                  radius_mode, {MAIN: depth, **extra_points})
  init = lambda: classes.split_state(init_split)  # noqa: E731
  return LPA(init, functools.partial(_apply, cfg), functools.partial(_refresh, cfg),
             functools.partial(_delta, cfg), functools.partial(_accumulate, cfg),
             functools.partial(_radii, cfg), tuple(extra_points))


def _radii_for(cfg: LPAConfig, state: LPAState, norm_C) -> dict:
  out = {}
  for p, d in cfg.depths.items():
    r = classes.class_radii(state.split, cfg.eps, cfg.delta_eps, cfg.beta, d, cfg.varied)
    out[p] = r * norm_C if cfg.radius_mode == "relative" else r
  return out


def _radii(cfg: LPAConfig, state: LPAState, act, labels_B):
  """``ε_C`` at the main point for this batch (relative radii use the class's mean ‖a‖)."""
  check_labels(labels_B, cfg.num_classes, "lpa.radii", act)
  onehot_BxC = jax.nn.one_hot(labels_B, cfg.num_classes)
  norm_C = per_class_mean(onehot_BxC, row_norms(jax.lax.stop_gradient(act)).astype(jnp.float32))
  return _radii_for(cfg, state, norm_C)[MAIN]


def _tables(cfg: LPAConfig, state, upper, act, labels_B, loss_fn, targets_BxC, extra_shapes):
  """PGD on the class tables: ``({point: δ_CxD}, clean_logits, ε_C at the main point)``."""
  loss_fn = loss_fn or default_loss
  if targets_BxC is None:
    targets_BxC = jax.nn.one_hot(labels_B, cfg.num_classes)
  act_sg = jax.lax.stop_gradient(act)
  extra_points = [p for p in cfg.depths if p != MAIN]

  def pgd_loss(t):
    a = add_delta(act_sg, t[MAIN], labels_B)
    logits = (upper(a, {p: gather_rows(t[p], labels_B) for p in extra_points}) if extra_points
              else upper(a))
    _check_logits(cfg, logits, targets_BxC)
    return jnp.sum(loss_fn(logits, targets_BxC)), logits

  # Tables accumulate in f32 whatever the network's dtype; add_delta casts them.
  shapes = {MAIN: act.shape[1:], **_extra_shapes(extra_points, extra_shapes)}
  tables0 = {p: jnp.zeros((cfg.num_classes,) + tuple(s), jnp.float32) for p, s in shapes.items()}
  onehot_BxC = jax.nn.one_hot(labels_B, cfg.num_classes)
  radius = _radii_for(cfg, state, per_class_mean(onehot_BxC,
                                                 row_norms(act_sg).astype(jnp.float32)))
  out, clean = class_pgd(pgd_loss, tables0, batch_counts(labels_B, cfg.num_classes),
                         state.sign_C, radius, cfg.steps, cfg.normalize, cfg.lowrank)
  return out, clean, radius[MAIN]


def _check_logits(cfg: LPAConfig, logits, targets_BxC) -> None:
  """The model's logits against ``num_classes`` first, then the targets: targets a caller did
  not pass are ``one_hot(labels, <the model's number of logits>)`` (``perturbed_apply``), so
  a model with another number of classes must be named as such, not as wrong targets."""
  if logits.ndim != 2:
    raise ValueError(f"lpa: the layers above the point must return logits of shape (batch, "
                     f"num_classes), got {tuple(logits.shape)}")
  if logits.shape[-1] != cfg.num_classes:
    raise ValueError(f"lpa was built with num_classes={cfg.num_classes}, but the layers above "
                     f"the point return logits of shape {tuple(logits.shape)}, the model's "
                     f"{logits.shape[-1]} classes: build it with num_classes={logits.shape[-1]}")
  if tuple(targets_BxC.shape) != tuple(logits.shape):
    raise ValueError(f"lpa: targets must have shape (batch, num_classes) = "
                     f"{tuple(logits.shape)}, got {tuple(targets_BxC.shape)}")


def _check_inputs(cfg: LPAConfig, act, labels_B, targets) -> None:
  """Static shape and dtype checks (and the label range outside jit); no effect on the math.
  The targets' classes are checked with the logits (:func:`_check_logits`)."""
  check_labels(labels_B, cfg.num_classes, "lpa", act)
  if targets is not None and (targets.ndim != 2 or targets.shape[0] != labels_B.shape[0]):
    raise ValueError(f"lpa: targets must have shape (batch, num_classes) = "
                     f"{(labels_B.shape[0], cfg.num_classes)}, got {tuple(targets.shape)}")


def _delta(cfg: LPAConfig, state, upper, act, labels_B, *, loss_fn=None, targets=None):
  _check_inputs(cfg, act, labels_B, targets)
  if len(cfg.depths) > 1:
    raise ValueError("lpa.delta returns one table; with extra_points use lpa.apply")
  return _tables(cfg, state, upper, act, labels_B, loss_fn, targets, None)[0][MAIN]


def _accumulate(cfg: LPAConfig, state: LPAState, clean_logits, labels_B) -> LPAState:
  check_labels(labels_B, cfg.num_classes, "lpa.accumulate", clean_logits)
  return state.observe(clean_logits, labels_B)


def _apply(cfg: LPAConfig, state, act, labels_B, upper, rng=None, train=True, *, loss_fn=None,
           targets=None, extra_shapes=None) -> Perturbed:
  _check_inputs(cfg, act, labels_B, targets)
  if targets is None:
    targets = jax.nn.one_hot(labels_B, cfg.num_classes)
  if not train:
    return Perturbed(act, targets, state)
  t, clean, radius_C = _tables(cfg, state, upper, act, labels_B, loss_fn, targets, extra_shapes)
  extra = {p: gather_rows(t[p], labels_B) for p in t if p != MAIN} or None
  clean = jax.lax.stop_gradient(clean)
  aux = {"sign_C": state.sign_C, "radius_C": radius_C, "class_stat_C": state.split.q_C,
         "delta_table_norm_C": row_norms(t[MAIN]),
         "split_ready": state.split_ready.astype(jnp.float32)}
  return Perturbed(add_delta(act, t[MAIN], labels_B), targets,
                   _accumulate(cfg, state, clean, labels_B), clean, aux, extra)


def _refresh(cfg: LPAConfig, state: LPAState, stats=None, epoch=None) -> LPAState:
  return state.refreshed(cfg.split, stats)


def _extra_shapes(extra_points, extra_shapes) -> dict:
  if not extra_points:
    return {}
  missing = [p for p in extra_points if not extra_shapes or p not in extra_shapes]
  if missing:
    raise ValueError(f"Multi-layer LPA needs the per-example activation shape at {missing}; "
                     "pass extra_shapes= to apply (lpa_jax.perturb.place does it for you)")
  return {p: tuple(extra_shapes[p]) for p in extra_points}
