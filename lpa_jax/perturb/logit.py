"""The logit-level family (SPEC §2): LPL, logit adjustment and LDAM-DRW.

Each is a logit-level :class:`~lpa_jax.perturb.base.Perturbation`: ``apply`` rewrites the
training logits and returns them (``Out.x``) with per-example loss weights (``Out.weights_B``)
and the method's new state (LPL's gathers the epoch's class statistics); ``predict`` rewrites
evaluation logits (post-hoc logit adjustment); ``refresh`` re-splits classes, once per epoch.

Each factory takes hyper-parameters only (no run ``Context``); combine them with
:func:`~lpa_jax.perturb.base.chain`:

>>> from lpa_jax.perturb import chain, logit_adjust, lpl
>>> counts = np.array([500, 50, 5])                   # training examples per class
>>> logits, y = jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0])
>>> method = chain(logit_adjust(counts, tau=1.0),
...                lpl(3, class_counts=counts, split="longtail", alpha=0.15, steps=20))
>>> state = method.init()
>>> out = jax.jit(method.apply)(state, logits, labels=y, step=0)   # out.x, .weights_B, .state
>>> state = method.refresh(out.state)                 # at the end of an epoch
>>> out.x.shape
(4, 3)
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from lpa_jax.perturb import classes
from lpa_jax.perturb.base import (Out, Perturbation, check_class_counts, check_finite_params,
                                  check_num_classes, keep_state, logit_method, unit_weights)
from lpa_jax.perturb.pgd import EPS
from lpa_jax.perturb.tables import row_norms

LA_MODES = ("loss", "posthoc")


def class_steps(split: classes.Split, steps: int, varied: bool, steps_min: int,
                steps_max: int) -> jax.Array:
  """``K_c``: constant, or from ``steps_min`` to ``steps_max`` linearly in ``|τ − q_c|``
  relative to the largest gap **(ours: the LPL paper only says K_c grows with the gap)**."""
  if not varied:
    return jnp.full(split.sign_C.shape, steps, jnp.int32)
  gap_C = jnp.abs(split.tau - split.q_C)
  frac_C = gap_C / jnp.maximum(gap_C.max(), EPS)
  return steps_min + jnp.round((steps_max - steps_min) * frac_C).astype(jnp.int32)


def class_logit_delta(z_BxC, onehot_BxC, targets_BxC, sign_C, alpha, steps_C, max_steps,
                      normalize=True):
  """``K_c`` steps ``δ_c ← δ_c + α s_c ĝ_c/‖ĝ_c‖``, ``ĝ_c = mean_{i∈S_c}(p_i − t_i)``.

  The class-mean logit gradient of cross-entropy is closed-form, so no autodiff is needed.
  Absent classes and classes with sign 0 keep ``δ_c = 0``.  Returns ``δ_CxC`` (a constant).
  """
  z_BxC = jax.lax.stop_gradient(z_BxC)
  count_C = onehot_BxC.sum(0)
  inv_n_C = 1.0 / jnp.maximum(count_C, 1.0)
  live_C = (count_C > 0) & (sign_C != 0)

  def body(k, delta_CxC):
    p_BxC = jax.nn.softmax(z_BxC + onehot_BxC @ delta_CxC)
    g_CxC = (onehot_BxC.T @ (p_BxC - targets_BxC)) * inv_n_C[:, None]
    if normalize:
      g_CxC = g_CxC / (row_norms(g_CxC)[:, None] + EPS)
    step_C = jnp.where(live_C & (k < steps_C), alpha * sign_C, 0.0)
    return delta_CxC + step_C[:, None] * g_CxC

  c = onehot_BxC.shape[-1]
  delta = jax.lax.fori_loop(0, max_steps, body, jnp.zeros((c, c), z_BxC.dtype))
  return jax.lax.stop_gradient(delta)


def check_count(who: str, **values) -> None:
  """Each value must be an int ``>= 0`` (step counts, start steps), named in the error."""
  for name, v in values.items():
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
      raise ValueError(f"{who}.{name} must be an int >= 0, got {v!r}")


def _check_lpl(alpha, steps, steps_min, steps_max) -> None:
  check_finite_params("lpl", alpha=alpha)
  if alpha < 0:
    raise ValueError(f"lpl.alpha must be >= 0, got {alpha}")
  check_count("lpl", steps=steps, steps_min=steps_min, steps_max=steps_max)
  if steps_min > steps_max:
    raise ValueError(f"lpl.steps_min must be <= lpl.steps_max, got {steps_min} > {steps_max}")
  # Each of K steps moves δ by about α (a unit direction when normalised; the loss's gradient
  # in the logits, of norm <= √2, otherwise), so |δ| <= ~α·K.  Past ~100 logits softmax is
  # saturated (e^-100 is 0 in float32): δ no longer perturbs the logits but replaces them, and
  # the run is something else under LPL's name.  K: the most steps a class can take
  # (whether ``varied`` is on is not known here, so steps_max counts too).
  max_shift, most_steps = 100.0, max(steps, steps_max)
  if alpha * most_steps > max_shift:
    raise ValueError(
        f"lpl.alpha={alpha:g} with up to {most_steps} steps (lpl.steps, lpl.steps_max) moves "
        f"a logit by up to alpha*steps = {alpha * most_steps:g} logits, above {max_shift:g}, "
        "where softmax is saturated: the perturbation would replace the logits rather than "
        "perturb them. Lower lpl.alpha (this repository's configs use 0.005-0.1) or the steps.")


def observe(state: classes.SplitState, logits_BxC, batch) -> classes.SplitState:
  """A class-level logit method's state with the batch's clean logits (``batch.clean_logits``,
  else the logits the method was given) added to its class statistics."""
  clean = logits_BxC if batch.clean_logits is None else batch.clean_logits
  return state.observe(clean, batch.labels_B)


def lpl(num_classes: int, *, split: str = "balanced", alpha: float = 0.005, steps: int = 20,
        varied: bool = False, steps_min: int = 10, steps_max: int = 40, normalize: bool = True,
        class_counts=None, num_head: int | None = None, signs=None) -> Perturbation:
  """LPL — class-level logit perturbation (Li et al.; SPEC §2): ``z_i ← z_i + δ_{y_i}``.

  Args:
    num_classes: ``C``, the number of logits.
    split: as LPA (``balanced`` q_c vs mean, refreshed per epoch; ``longtail`` frequency rank
      with ``num_head`` head classes, default :func:`classes.default_num_head`, which needs
      ``class_counts``; ``signs`` a given sign vector ``signs``; ...).
    alpha, steps: step size ``α`` and fixed ``K``; ``varied`` uses ``K_c`` in
      ``[steps_min, steps_max]`` growing with ``|τ − q_c|``.
    normalize: normalised steps (SPEC) or raw gradient steps.
    class_counts: training count of each class (needed by ``split='longtail'``).

  >>> m = lpl(10, split="balanced", alpha=0.005, steps=20)
  >>> counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]   # CIFAR-10-LT
  >>> m = lpl(10, split="longtail", class_counts=counts, alpha=0.15)
  >>> out = m.apply(m.init(), jnp.zeros((2, 10)), labels=jnp.array([0, 9]))
  >>> out.x.shape, m.level
  ((2, 10), 'logit')
  """
  num_classes = check_num_classes("lpl", num_classes)
  class_counts = check_class_counts("lpl", class_counts, num_classes, required=False)
  _check_lpl(alpha, steps, steps_min, steps_max)
  init_split = classes.method_split("lpl", split, num_classes, class_counts, signs, num_head)
  max_steps = steps_max if varied else steps

  def apply(state, logits_BxC, batch, step):
    onehot_BxC = jax.nn.one_hot(batch.labels_B, num_classes, dtype=logits_BxC.dtype)
    steps_C = class_steps(state.split, steps, varied, steps_min, steps_max)
    delta_CxC = class_logit_delta(logits_BxC, onehot_BxC, batch.targets_BxC, state.sign_C,
                                  alpha, steps_C, max_steps, normalize)
    aux = {"lpl_delta_norm_C": row_norms(delta_CxC), "lpl_steps_C": steps_C.astype(jnp.float32)}
    return Out(logits_BxC + onehot_BxC @ delta_CxC, observe(state, logits_BxC, batch), None,
               unit_weights(logits_BxC), aux=aux)

  def refresh(state, stats=None, epoch=None):
    return state.refreshed(split, stats)

  return logit_method(lambda: classes.split_state(init_split), apply, refresh)


def log_prior(class_counts) -> np.ndarray:
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)  # empty class: no -inf
  return np.log(counts / counts.sum()).astype(np.float32)


def logit_adjust(class_counts, *, tau: float = 1.0, mode: str = "loss") -> Perturbation:
  """Logit adjustment (Menon et al. 2021) with ``π`` the training class frequencies.

  ``mode='loss'``: train on ``ℓ(z + τ log π, y)``, predict with ``z``;
  ``mode='posthoc'``: train on ``z``, predict with ``z − τ log π``.

  Args:
    class_counts: training count of each class (``π_c ∝ n_c``; an empty class counts as 1).
    tau: the temperature ``τ``.
    mode: ``'loss'`` or ``'posthoc'``.

  >>> m = logit_adjust([90, 10], tau=1.0, mode="posthoc")
  >>> np.asarray(m.predict(m.init(), jnp.zeros((1, 2)))).round(3)   # z − τ log π
  array([[0.105, 2.303]], dtype=float32)
  """
  class_counts = check_class_counts("logit_adjust", class_counts)
  check_finite_params("logit_adjust", tau=tau)
  if mode not in LA_MODES:
    raise ValueError(f"logit_adjust.mode must be one of {LA_MODES}, got {mode!r}")
  shift_C = tau * jnp.asarray(log_prior(class_counts))

  def apply(state, logits_BxC, batch, step):
    out = logits_BxC + shift_C if mode == "loss" else logits_BxC
    return Out(out, state, None, unit_weights(logits_BxC))

  def predict(state, logits_BxC):
    return logits_BxC - shift_C if mode == "posthoc" else logits_BxC

  return logit_method(lambda: (), apply, keep_state, predict)


def ldam_margins(class_counts, max_margin: float = 0.5) -> np.ndarray:
  """``m_c ∝ n_c^(−1/4)``, rescaled so the rarest class gets ``max_margin``."""
  m = np.maximum(np.asarray(class_counts, np.float64), 1.0) ** -0.25
  return (m * max_margin / m.max()).astype(np.float32)


def drw_weights(class_counts, beta: float = 0.9999) -> np.ndarray:
  """Class-balanced weights ``(1−β)/(1−β^{n_c})``, normalised to sum to ``C``."""
  n = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  w = (1.0 - beta) / (1.0 - beta ** n)
  return (w * len(w) / w.sum()).astype(np.float32)


def drw_start(num_epochs: int, steps_per_epoch: int, fraction: float = 0.8) -> int:
  """The first DRW step: epoch ``round(fraction·num_epochs)`` (160 of 200) of the run.

  >>> drw_start(200, 10)
  1600
  """
  return int(round(fraction * num_epochs)) * steps_per_epoch


def _drw_start_step(drw, drw_start_step, num_epochs, steps_per_epoch, drw_fraction) -> int:
  """When DRW starts: ``drw_start_step`` as given, or from the run's length (see :func:`ldam`)."""
  check_finite_params("ldam", drw_fraction=drw_fraction)
  if not 0.0 <= drw_fraction <= 1.0:
    raise ValueError(f"ldam.drw_fraction must lie in [0, 1], got {drw_fraction}")
  if drw_start_step is not None:
    if num_epochs is not None or steps_per_epoch is not None:
      raise ValueError("ldam: give drw_start_step, or num_epochs and steps_per_epoch, not both")
    check_count("ldam", drw_start_step=drw_start_step)
    return int(drw_start_step)
  if (num_epochs is None) != (steps_per_epoch is None):
    missing = "steps_per_epoch" if steps_per_epoch is None else "num_epochs"
    raise ValueError(f"ldam: num_epochs and steps_per_epoch go together; {missing} is missing")
  if num_epochs is None:
    if drw:
      raise ValueError("ldam with drw=True needs to know when DRW starts: pass drw_start_step=, "
                       "or num_epochs= and steps_per_epoch= (DRW from epoch "
                       "round(drw_fraction·num_epochs))")
    return 0  # never read: DRW is off
  check_count("ldam", num_epochs=num_epochs, steps_per_epoch=steps_per_epoch)
  if min(num_epochs, steps_per_epoch) < 1:
    raise ValueError(f"ldam needs num_epochs >= 1 and steps_per_epoch >= 1, got {num_epochs} "
                     f"and {steps_per_epoch}")
  return drw_start(num_epochs, steps_per_epoch, drw_fraction)


def _check_ldam(normalized_head, max_margin, scale, drw_beta) -> None:
  if not normalized_head:
    raise ValueError("ldam needs a normalised (cosine) classifier, as published: build the "
                     "model with head='cosine' (config.model.kwargs.head = 'cosine') and pass "
                     "normalized_head=True; its scale s multiplies cosines in [-1, 1]")
  check_finite_params("ldam", max_margin=max_margin, scale=scale, drw_beta=drw_beta)
  if max_margin < 0 or scale <= 0:
    raise ValueError(f"ldam needs max_margin >= 0 and scale > 0; got max_margin={max_margin}, "
                     f"scale={scale}")
  if not 0.0 <= drw_beta < 1.0:
    raise ValueError(f"ldam.drw_beta must lie in [0, 1), got {drw_beta}")


def ldam(class_counts, *, normalized_head: bool = False, max_margin: float = 0.5,
         scale: float = 30.0, drw: bool = True, drw_beta: float = 0.9999,
         drw_start_step: int | None = None, num_epochs: int | None = None,
         steps_per_epoch: int | None = None, drw_fraction: float = 0.8,
         batch_normalize: bool = True) -> Perturbation:
  """LDAM-DRW (Cao et al. 2019) on a normalised classifier: train on ``s·(cos − m_y e_y)``;
  from step ``drw_start_step`` on, weight examples by :func:`drw_weights`.

  The published method needs logits that are cosines (ℓ2-normalised features and class
  weights): the scale ``s = 30`` is chosen for values in [-1, 1], and margins of up to 0.5 are
  meaningful only against them.  Build the model with ``head='cosine'`` and pass
  ``normalized_head=True``; with a linear head this raises rather than train another method.

  Args:
    class_counts: training count of each class (margins ``∝ n_c^(−1/4)``, DRW weights); its
      length is the number of classes.
    max_margin, scale: the rarest class's margin and ``s``.
    drw, drw_beta: deferred re-weighting on/off and the class-balanced ``β``.
    drw_start_step: the first re-weighted step; or give ``num_epochs`` and
      ``steps_per_epoch`` to start at epoch ``round(drw_fraction·num_epochs)`` (160 of 200),
      see :func:`drw_start`.  Not needed with ``drw=False``.
    batch_normalize: rescale the weights to mean 1 over the batch, which turns the step's
      ``mean(w·ℓ)`` into the weighted mean of PyTorch's ``cross_entropy(weight=...)`` used
      by the reference code.

  ``predict`` is the plain cosine (no margin and no scale at test time; the scale would not
  change the ranking).

  >>> from lpa_jax.models import get_model
  >>> model = get_model("resnet32", 10, head="cosine")
  >>> counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]   # CIFAR-10-LT
  >>> m = ldam(counts, normalized_head=True, num_epochs=200, steps_per_epoch=391)
  >>> out = m.apply(m.init(), jnp.zeros((2, 10)), labels=jnp.array([0, 9]), step=0)
  >>> np.asarray(out.x)[:, [0, 9]].round(1)   # s·(cos − m_y): the rare class's margin is 0.5
  array([[ -4.7,   0. ],
         [  0. , -15. ]], dtype=float32)
  """
  _check_ldam(normalized_head, max_margin, scale, drw_beta)
  class_counts = check_class_counts("ldam", class_counts)
  num_classes = len(class_counts)
  start = _drw_start_step(drw, drw_start_step, num_epochs, steps_per_epoch, drw_fraction)
  margin_C = jnp.asarray(ldam_margins(class_counts, max_margin))
  weight_C = jnp.asarray(drw_weights(class_counts, drw_beta))

  def apply(state, cos_BxC, batch, step):
    onehot_BxC = jax.nn.one_hot(batch.labels_B, num_classes, dtype=cos_BxC.dtype)
    out = scale * (cos_BxC - onehot_BxC * margin_C)
    on = jnp.asarray(drw) & (step >= start)
    w_B = jnp.where(on, onehot_BxC @ weight_C, 1.0)
    if batch_normalize:
      w_B = w_B * w_B.shape[0] / jnp.sum(w_B)
    return Out(out, state, None, w_B, aux={"drw_on": on.astype(jnp.float32)})

  return logit_method(lambda: (), apply, keep_state)
