"""LPA — Learning to Perturb Activations (SPEC §1), as a transform of an activation.

At one named point a class-level vector ``δ_{y_i}`` is added to every sample's activation.
``δ`` is found afresh for each mini-batch by ``T`` steps of PGD through the layers above the
point only — ascending the training loss for positive (hard / rare) classes, descending it for
negative (easy / frequent) ones — and then held constant for the training loss.

Built from hyper-parameters alone, used through pure, jittable functions (like optax)::

    method = lpa(num_classes=10, split="longtail", class_counts=counts, eps=0.5,
                 radius_mode="relative")
    state = method.init()
    out = method.apply(state, act, labels=labels, upper=upper)   # δ by PGD, added; out.x
    state = method.refresh(out.state)                        # at an epoch boundary you choose
    delta_CxD = method.info["delta"](state, upper, act, labels)  # just the class table

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
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from lpa_jax.perturb import classes
from lpa_jax.perturb.base import (Out, Perturbation, check_class_counts, check_extra,
                                  check_finite_params, check_labels, check_num_classes,
                                  default_loss)
from lpa_jax.perturb.pgd import class_pgd
from lpa_jax.perturb.tables import class_counts as batch_counts
from lpa_jax.perturb.tables import gather_rows, per_class_mean, row_norms

RADIUS_MODES = ("absolute", "relative", "loss")
# radius_mode="loss" defaults (ours): a gentle gain (a 10x miss moves ε_c by 10^0.2 = 1.6x per
# step) and bounds relative to the class's mean ‖a‖, from "no perturbation to speak of" to "δ
# as large as the activation itself".
LOSS_DEFAULTS = {"target_delta": 0.0, "eta": 0.2, "eps_min": 1e-4, "eps_max": 1.0}
MAIN = "act"  # key of the perturbed point's table among the (multi-layer) tables


# LPA's state: its class split and this epoch's running class statistics (the state every
# class-level method keeps, :class:`~lpa_jax.perturb.classes.SplitState`).
LPAState = classes.SplitState

_LossStateFields = NamedTuple("_LossStateFields", [("split", classes.Split),
                                                   ("stats", classes.ClassStats),
                                                   ("log_radius_C", jax.Array)])


class LossState(_LossStateFields):
  """LPA's state with ``radius_mode="loss"``: the split state's fields plus ``log_radius_C``,
  each class's log radius relative to its mean activation norm, adapted every step (so it is
  checkpointed and restored with the rest of the state)."""
  __slots__ = ()
  # The split state's behaviour, shared as is: observe and refreshed keep log_radius_C.
  sign_C = classes.SplitState.sign_C
  split_ready = classes.SplitState.split_ready
  observe = classes.SplitState.observe
  refreshed = classes.SplitState.refreshed


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


def _loss_params(radius_mode, eps, extra_points, **given) -> dict:
  """Loss mode's hyper-parameters with their defaults filled in; all ``None`` in other modes."""
  check_finite_params("lpa", **given)
  if radius_mode != "loss":
    stray = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
    if stray:
      raise ValueError(f"lpa: {stray} only apply with radius_mode='loss' (the strength set in "
                       f"nats), got radius_mode={radius_mode!r}; leave them None or set "
                       "radius_mode='loss'")
    return given
  if given["target"] is None:
    raise ValueError("lpa with radius_mode='loss' needs lpa.target, the mean |loss change| per "
                     "class to hold, in nats (e.g. 0.1)")
  p = {**LOSS_DEFAULTS, **{k: float(v) for k, v in given.items() if v is not None}}
  if p["target"] <= 0 or p["target_delta"] < 0:
    raise ValueError(f"lpa needs target > 0 and target_delta >= 0 (nats); got "
                     f"target={p['target']}, target_delta={p['target_delta']}")
  if not 0 < p["eta"] <= 1:
    raise ValueError(f"lpa.eta (the gain of the radius update in log space) must lie in (0, 1], "
                     f"got {p['eta']}: above 1 the radius overshoots the target each step")
  if not 0 < p["eps_min"] <= p["eps_max"]:
    raise ValueError(f"lpa needs 0 < eps_min <= eps_max (bounds of the radius relative to the "
                     f"class's mean ‖a‖); got eps_min={p['eps_min']}, eps_max={p['eps_max']}")
  if eps <= 0:
    raise ValueError(f"lpa.eps must be > 0 with radius_mode='loss', got {eps}: it sets the "
                     "starting relative radius, which the target then adapts")
  if extra_points:
    raise ValueError("lpa: radius_mode='loss' adapts one radius per class from one loss change "
                     f"and cannot share it among several points; drop extra_points "
                     f"{sorted(extra_points)} or use radius_mode='relative'")
  return p


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
  # radius_mode="loss" only (None otherwise): see lpa().
  target: float | None = None
  target_delta: float | None = None
  eta: float | None = None
  eps_min: float | None = None
  eps_max: float | None = None


def lpa(num_classes: int, split: str = "balanced", eps: float = 0.1, delta_eps: float = 0.1,
        beta: float = 0.7, steps: int = 3, varied: bool = True, normalize: bool = True,
        lowrank: float | None = None, radius_mode: str = "absolute", depth: float = 0,
        class_counts=None, num_head: int | None = None, signs=None,
        extra_points: Mapping[str, float] | None = None, target: float | None = None,
        target_delta: float | None = None, eta: float | None = None,
        eps_min: float | None = None, eps_max: float | None = None) -> Perturbation:
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
      in the batch (ours: ``ε`` is then a fraction of ``‖a‖``), or ``loss`` (ours, SPEC §1
      "strength in loss units"): the knob is ``target``, a loss change in nats.  Each class's
      relative radius ``ε_c`` lives in the state (``log_radius_C``), starts at the relative
      radius the other arguments give, and after each step's PGD moves as
      ``log ε_c ← clip(log ε_c + η(log λ_c − log|Δℓ_c|), log eps_min, log eps_max)``, ``Δℓ_c``
      the class's mean perturbed − clean loss, for present signed classes with ``Δℓ_c ≠ 0``.
      ``β^(L−l)`` plays no part after the start.  Costs one more forward pass above the point.
    target, target_delta: ``λ_c = λ + Δλ|τ − q_c|`` (varied) or ``λ`` (fixed), in nats; loss
      mode only (required there; ``target_delta`` default 0).
    eta: the update's gain in log space, in ``(0, 1]``; loss mode only, default 0.2.
    eps_min, eps_max: bounds of ``ε_c`` relative to the class's mean ``‖a‖``; loss mode only,
      defaults 1e-4 and 1.
    depth: ``L − l`` of the point, for ``β^(L−l)`` (the one place it is set: a cut does not
      carry it; ``lpa_jax.models.staged.depth_below_logits(model.points, point)`` tells it
      for lpa_jax's own models).
    class_counts: training examples per class (long-tail split), ``num_classes`` of them.
    num_head: head size of the long-tail split; default :func:`classes.median_num_head`, the
      SPEC's rule (classes with a below-median count are P). A config run shares one head
      with LPL and LPG instead (:func:`classes.run_num_head`, ``round(0.4·C)`` unless set).
    extra_points: ``{name: depth}`` of higher points perturbed jointly (multi-layer variant;
      the network's ``upper(act, extra)`` must accept per-example tensors there).

  Returns:
    an activation-level :class:`~lpa_jax.perturb.base.Perturbation`; ``info`` holds
    ``delta(state, upper, act, labels) -> δ_CxD``, ``radii(state, act, labels) -> ε_C``,
    ``accumulate(state, clean_logits, labels) -> state`` and ``extra_points``.

  >>> method = lpa(3, split="all_positive", eps=0.5)
  >>> act_BxD, labels_B = jnp.ones((8, 8)), jnp.arange(8) % 3
  >>> upper = lambda a_BxD: a_BxD @ jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)   # layers above
  >>> apply = jax.jit(method.apply, static_argnames="upper")
  >>> out = apply(method.init(), act_BxD, labels=labels_B, upper=upper)
  >>> np.asarray(jnp.linalg.norm(out.x - act_BxD, axis=1)).round(3)   # ‖δ_y‖ = ε, loss ascended
  array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=float32)
  """
  num_classes = check_num_classes("lpa", num_classes)
  check_class_counts("lpa", class_counts, num_classes, required=False)
  _validate(steps, eps, delta_eps, beta, radius_mode, depth, varied, lowrank)
  extra_points = dict(extra_points or {})
  loss_kw = _loss_params(radius_mode, eps, extra_points, target=target,
                         target_delta=target_delta, eta=eta, eps_min=eps_min, eps_max=eps_max)
  for p, d in extra_points.items():
    check_finite_params("lpa", **{f"extra_points[{p}]": d})
  if num_head is None and split == "longtail" and class_counts is not None:
    num_head = classes.median_num_head(class_counts)
  init_split = classes.initial_split(split, num_classes, class_counts, signs, num_head)
  cfg = LPAConfig(num_classes, split, eps, delta_eps, beta, steps, varied, normalize, lowrank,
                  radius_mode, {MAIN: depth, **extra_points}, **loss_kw)
  init = lambda: _init_state(cfg, init_split)  # noqa: E731
  info = {"delta": functools.partial(_delta, cfg),
          "accumulate": functools.partial(_accumulate, cfg),
          "radii": functools.partial(_radii, cfg), "extra_points": tuple(extra_points)}
  return Perturbation(init, functools.partial(_apply, cfg), functools.partial(_refresh, cfg),
                      "activation", info=info)


def _init_state(cfg: LPAConfig, split: classes.Split) -> LPAState | LossState:
  state = classes.split_state(split)
  if cfg.radius_mode != "loss":
    return state
  # Loss mode starts where relative mode would (β^(L−l) included): its first step is the
  # relative run's, at a radius already known to perturb; the target steers it from there.
  r_C = classes.class_radii(split, cfg.eps, cfg.delta_eps, cfg.beta, cfg.depths[MAIN],
                            cfg.varied)
  return LossState(*state, jnp.log(jnp.clip(r_C, cfg.eps_min, cfg.eps_max)))


def _adapt(cfg: LPAConfig, state: LossState, dloss_C, count_C) -> LossState:
  """Loss mode's multiplicative radius update from the classes' mean loss change ``dloss_C``."""
  s = state.split
  lam_C = cfg.target + (cfg.target_delta * jnp.abs(s.tau - s.q_C) if cfg.varied else 0.0)
  mag_C = jnp.abs(dloss_C)
  # Absent or unsigned classes measured nothing; a zero (or non-finite) change has no log:
  # their radius stays.  The where keeps log's argument safe under jit.
  ok_C = (count_C > 0) & (state.sign_C != 0) & (mag_C > 0) & jnp.isfinite(mag_C)
  step_C = cfg.eta * (jnp.log(lam_C) - jnp.log(jnp.where(ok_C, mag_C, 1.0)))
  new_C = jnp.clip(state.log_radius_C + step_C, jnp.log(cfg.eps_min), jnp.log(cfg.eps_max))
  return state._replace(log_radius_C=jnp.where(ok_C, new_C, state.log_radius_C))


def _radii_for(cfg: LPAConfig, state: LPAState, norm_C) -> dict:
  if cfg.radius_mode == "loss":  # one point (extra_points are refused in loss mode)
    return {MAIN: jnp.exp(state.log_radius_C) * norm_C}
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


class _PGDOut(NamedTuple):
  tables: dict             # {point: δ_CxD}
  clean_logits: jax.Array
  radius_C: jax.Array      # ε_c used at the main point (absolute)
  grad_norm_C: jax.Array   # ‖g_c‖ at δ = 0 at the main point
  state: LPAState          # loss mode: with the adapted radii; else the input state


def _tables(cfg: LPAConfig, state, upper, act, labels_B, loss_fn, targets_BxC,
            extra_shapes) -> _PGDOut:
  """PGD on the class tables, at the radii ``state`` gives; loss mode adapts them after."""
  loss_fn = loss_fn or default_loss
  if targets_BxC is None:
    targets_BxC = jax.nn.one_hot(labels_B, cfg.num_classes)
  act_sg = jax.lax.stop_gradient(act)
  extra_points = [p for p in cfg.depths if p != MAIN]

  def per_example(t):
    a = add_delta(act_sg, t[MAIN], labels_B)
    logits = (upper(a, {p: gather_rows(t[p], labels_B) for p in extra_points}) if extra_points
              else upper(a))
    _check_logits(cfg, logits, targets_BxC)
    return loss_fn(logits, targets_BxC), logits

  def pgd_loss(t):
    loss_B, logits = per_example(t)
    return jnp.sum(loss_B), (logits, loss_B)

  # Tables accumulate in f32 whatever the network's dtype; add_delta casts them.
  shapes = {MAIN: act.shape[1:], **_extra_shapes(extra_points, extra_shapes)}
  tables0 = {p: jnp.zeros((cfg.num_classes,) + tuple(s), jnp.float32) for p, s in shapes.items()}
  onehot_BxC = jax.nn.one_hot(labels_B, cfg.num_classes)
  radius = _radii_for(cfg, state, per_class_mean(onehot_BxC,
                                                 row_norms(act_sg).astype(jnp.float32)))
  count_C = batch_counts(labels_B, cfg.num_classes)
  out, (clean, clean_loss_B), grad_norm = class_pgd(
      pgd_loss, tables0, count_C, state.sign_C, radius, cfg.steps, cfg.normalize, cfg.lowrank,
      grad_norm=True)
  if cfg.radius_mode == "loss":
    # PGD evaluated the loss at δ_0 … δ_{T−1} only: the final δ's loss is loss mode's one
    # extra forward pass (forward only, above the point).
    f32 = lambda x: jax.lax.stop_gradient(x).astype(jnp.float32)  # noqa: E731  (bf16 losses)
    dloss_B = f32(per_example(out)[0]) - f32(clean_loss_B)
    state = _adapt(cfg, state, per_class_mean(onehot_BxC, dloss_B), count_C)
  return _PGDOut(out, clean, radius[MAIN], grad_norm[MAIN], state)


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
  return _tables(cfg, state, upper, act, labels_B, loss_fn, targets, None).tables[MAIN]


def _accumulate(cfg: LPAConfig, state: LPAState, clean_logits, labels_B) -> LPAState:
  check_labels(labels_B, cfg.num_classes, "lpa.accumulate", clean_logits)
  return state.observe(clean_logits, labels_B)


def _apply(cfg: LPAConfig, state, act, *, labels, upper, rng=None, train=True, loss_fn=None,
           targets=None, extra_shapes=None, **unused) -> Out:
  check_extra("lpa", unused)
  labels_B = labels
  _check_inputs(cfg, act, labels_B, targets)
  if targets is None:
    targets = jax.nn.one_hot(labels_B, cfg.num_classes)
  if not train:
    return Out(act, state, targets)
  # `state` comes back with loss mode's adapted radii (for the next step).
  t, clean, radius_C, grad_norm_C, state = _tables(cfg, state, upper, act, labels_B, loss_fn,
                                                   targets, extra_shapes)
  extra = {p: gather_rows(t[p], labels_B) for p in t if p != MAIN} or None
  clean = jax.lax.stop_gradient(clean)
  aux = {"sign_C": state.sign_C, "radius_C": radius_C, "class_stat_C": state.split.q_C,
         "delta_table_norm_C": row_norms(t[MAIN]), "grad_norm_C": grad_norm_C,
         "split_ready": state.split_ready.astype(jnp.float32)}
  return Out(add_delta(act, t[MAIN], labels_B), _accumulate(cfg, state, clean, labels_B),
             targets, None, clean, aux, extra)


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
