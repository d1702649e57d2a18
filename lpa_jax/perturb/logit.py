"""The logit-level family (SPEC §2): LPL, logit adjustment and LDAM-DRW.

Each is a :class:`~lpa_jax.perturb.base.LogitMethod`: ``apply`` rewrites the training logits
and returns per-example loss weights; ``predict`` rewrites evaluation logits (post-hoc logit
adjustment); ``refresh`` re-splits classes once per epoch.

>>> method = lpl(ctx, split="longtail", alpha=0.15, steps=20)
>>> logits, w_B, aux = method.apply(method.init(), logits, batch, step)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpa_jax.perturb import classes
from lpa_jax.perturb.base import Context, LogitMethod, keep_state
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


def lpl(ctx: Context, split: str = "balanced", alpha: float = 0.005, steps: int = 20,
        varied: bool = False, steps_min: int = 10, steps_max: int = 40, normalize: bool = True,
        num_head: int | None = None, signs=None) -> LogitMethod:
  """LPL — class-level logit perturbation (Li et al.; SPEC §2): ``z_i ← z_i + δ_{y_i}``.

  Args:
    split: as LPA (``balanced`` q_c vs mean, refreshed per epoch; ``longtail`` frequency rank
      with ``num_head`` head classes, default :func:`classes.default_num_head`; ...).
    alpha, steps: step size ``α`` and fixed ``K``; ``varied`` uses ``K_c`` in
      ``[steps_min, steps_max]`` growing with ``|τ − q_c|``.
    normalize: normalised steps (SPEC) or raw gradient steps.

  >>> m = lpl(ctx, split="balanced", alpha=0.005, steps=20)
  """
  if min(steps, steps_min, steps_max) < 0 or steps_min > steps_max or alpha < 0:
    raise ValueError(f"lpl needs alpha >= 0 and 0 <= steps_min <= steps_max, steps >= 0; got "
                     f"alpha={alpha}, steps={steps}, steps_min={steps_min}, steps_max={steps_max}")
  init_split = classes.initial_split(split, ctx.num_classes, ctx.class_counts, signs, num_head)
  max_steps = steps_max if varied else steps

  def apply(state, logits_BxC, batch, step):
    onehot_BxC = jax.nn.one_hot(batch.labels_B, ctx.num_classes, dtype=logits_BxC.dtype)
    steps_C = class_steps(state, steps, varied, steps_min, steps_max)
    delta_CxC = class_logit_delta(logits_BxC, onehot_BxC, batch.targets_BxC, state.sign_C,
                                  alpha, steps_C, max_steps, normalize)
    aux = {"lpl_delta_norm_C": row_norms(delta_CxC), "lpl_steps_C": steps_C.astype(jnp.float32)}
    return logits_BxC + onehot_BxC @ delta_CxC, jnp.ones_like(logits_BxC[:, 0]), aux

  def refresh(state, stats, epoch):
    return classes.refresh_split(split, state, stats)

  return LogitMethod(lambda: init_split, apply, refresh)


def log_prior(class_counts) -> np.ndarray:
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)  # empty class: no -inf
  return np.log(counts / counts.sum()).astype(np.float32)


def logit_adjust(ctx: Context, tau: float = 1.0, mode: str = "loss") -> LogitMethod:
  """Logit adjustment (Menon et al. 2021) with ``π`` the training class frequencies.

  ``mode='loss'``: train on ``ℓ(z + τ log π, y)``, predict with ``z``;
  ``mode='posthoc'``: train on ``z``, predict with ``z − τ log π``.

  >>> m = logit_adjust(ctx, tau=1.0, mode="posthoc")
  """
  if mode not in LA_MODES:
    raise ValueError(f"logit_adjust.mode must be one of {LA_MODES}, got {mode!r}")
  shift_C = tau * jnp.asarray(log_prior(ctx.class_counts))

  def apply(state, logits_BxC, batch, step):
    out = logits_BxC + shift_C if mode == "loss" else logits_BxC
    return out, jnp.ones_like(logits_BxC[:, 0]), {}

  def predict(state, logits_BxC):
    return logits_BxC - shift_C if mode == "posthoc" else logits_BxC

  return LogitMethod(lambda: (), apply, keep_state, predict)


def ldam_margins(class_counts, max_margin: float = 0.5) -> np.ndarray:
  """``m_c ∝ n_c^(−1/4)``, rescaled so the rarest class gets ``max_margin``."""
  m = np.maximum(np.asarray(class_counts, np.float64), 1.0) ** -0.25
  return (m * max_margin / m.max()).astype(np.float32)


def drw_weights(class_counts, beta: float = 0.9999) -> np.ndarray:
  """Class-balanced weights ``(1−β)/(1−β^{n_c})``, normalised to sum to ``C``."""
  n = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  w = (1.0 - beta) / (1.0 - beta ** n)
  return (w * len(w) / w.sum()).astype(np.float32)


def ldam(ctx: Context, max_margin: float = 0.5, scale: float = 30.0, drw: bool = True,
         drw_beta: float = 0.9999, drw_fraction: float = 0.8, batch_normalize: bool = True,
         normalized_head: bool = False) -> LogitMethod:
  """LDAM-DRW (Cao et al. 2019) on a normalised classifier: train on ``s·(cos − m_y e_y)``;
  from epoch ``round(drw_fraction·num_epochs)`` (160 of 200) weight examples by
  :func:`drw_weights`.

  The published method needs logits that are cosines (ℓ2-normalised features and class
  weights): the scale ``s = 30`` is chosen for values in [-1, 1], and margins of up to 0.5 are
  meaningful only against them.  Build the model with ``head='cosine'`` and pass
  ``normalized_head=True``; with a linear head this raises rather than train another method.

  ``batch_normalize`` rescales the weights to mean 1 over the batch, which turns the step's
  ``mean(w·ℓ)`` into the weighted mean of PyTorch's ``cross_entropy(weight=...)`` used by the
  reference code.  ``predict`` is the plain cosine (no margin and no scale at test time; the
  scale would not change the ranking).

  >>> model = get_model("resnet32", 10, head="cosine")
  >>> m = ldam(ctx, max_margin=0.5, scale=30.0, drw_fraction=0.8, normalized_head=True)
  """
  if not normalized_head:
    raise ValueError("ldam needs a normalised (cosine) classifier, as published: build the "
                     "model with head='cosine' (config.model.kwargs.head = 'cosine') and pass "
                     "normalized_head=True; its scale s multiplies cosines in [-1, 1]")
  if not 0.0 <= drw_fraction <= 1.0:
    raise ValueError(f"ldam.drw_fraction must lie in [0, 1], got {drw_fraction}")
  margin_C = jnp.asarray(ldam_margins(ctx.class_counts, max_margin))
  weight_C = jnp.asarray(drw_weights(ctx.class_counts, drw_beta))
  drw_start = int(round(drw_fraction * ctx.num_epochs)) * ctx.steps_per_epoch

  def apply(state, cos_BxC, batch, step):
    onehot_BxC = jax.nn.one_hot(batch.labels_B, ctx.num_classes, dtype=cos_BxC.dtype)
    out = scale * (cos_BxC - onehot_BxC * margin_C)
    on = jnp.asarray(drw) & (step >= drw_start)
    w_B = jnp.where(on, onehot_BxC @ weight_C, 1.0)
    if batch_normalize:
      w_B = w_B * w_B.shape[0] / jnp.sum(w_B)
    return out, w_B, {"drw_on": on.astype(jnp.float32)}

  return LogitMethod(lambda: (), apply, keep_state)

