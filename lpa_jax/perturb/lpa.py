"""LPA — Learning to Perturb Activations (SPEC §1).

At one (or several) named points, a class-level vector ``δ_{y_i}`` is added to every sample's
activation.  ``δ`` is found afresh for each mini-batch by ``T`` steps of PGD through the layers
above the point only — ascending the loss for positive (hard / rare) classes, descending it
for negative (easy / frequent) ones — and then held constant for the training loss.

>>> method = lpa(ctx, point="stage3", split="longtail", eps=0.1, steps=3)
>>> fwd = method.forward(method.init(), variables, batch, rng, True)
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from lpa_jax.perturb import classes
from lpa_jax.perturb.base import (ActivationMethod, Context, Forward, gather_rows, per_class_mean,
                                  perturbation_diagnostics, sample_norms)
from lpa_jax.perturb.pgd import class_pgd

RADIUS_MODES = ("absolute", "relative")


def lpa(ctx: Context, point: str, split: str = "balanced", eps: float = 0.1,
        delta_eps: float = 0.1, beta: float = 0.7, steps: int = 3, varied: bool = True,
        normalize: bool = True, lowrank: float | None = None, extra_points: Sequence[str] = (),
        radius_mode: str = "absolute", num_head: int | None = None, signs=None) -> ActivationMethod:
  """Builds the LPA activation method.

  Args:
    ctx: run context (classes, counts, how to cut the model).
    point: the perturbed point (the cut); ``extra_points`` above it are perturbed jointly
      (multi-layer variant, staged models only).
    split: ``balanced`` / ``balanced_accuracy`` (q_c vs its mean, refreshed each epoch),
      ``longtail`` (frequency rank), ``all_positive`` (domain generalisation),
      ``all_negative``, or ``signs`` (a user-given vector ``signs``).
    eps, delta_eps, beta, varied: radius ``β^(L−l)(ε + Δε|τ − q_c|)``, or ``β^(L−l)ε`` if fixed.
    steps: PGD steps ``T``; step size ``2ε_c/T``.
    normalize: normalised PGD step (ours) or the paper's raw gradient step.
    lowrank: top-k fraction for the low-rank gradient variant (``0.25`` = ``k = d/4``).
    radius_mode: ``absolute`` ℓ2 radius, or ``relative`` to the class's mean activation norm (ours).
  """
  if steps < 1:
    raise ValueError(f"lpa.steps must be >= 1, got {steps}")
  if eps < 0 or delta_eps < 0 or not 0 < beta <= 1:
    raise ValueError(f"lpa needs eps >= 0, delta_eps >= 0 and 0 < beta <= 1; got eps={eps}, "
                     f"delta_eps={delta_eps}, beta={beta}")
  if radius_mode not in RADIUS_MODES:
    raise ValueError(f"lpa.radius_mode must be one of {RADIUS_MODES}, got {radius_mode!r}")
  cut = ctx.cut_fn(point)
  points = (point,) + tuple(p for p in extra_points if p != point)
  depth = {p: cut.depth if p == point else ctx.cut_fn(p).depth for p in points}
  init_split = classes.initial_split(split, ctx.num_classes, ctx.class_counts, signs, num_head)

  def radii(split_state, act_norm_C):
    out = {}
    for p in points:
      r = classes.class_radii(split_state, eps, delta_eps, beta, depth[p], varied)
      out[p] = r * act_norm_C if radius_mode == "relative" else r
    return out

  def forward(state, variables, batch, rng, train):
    act, st = cut.lower(variables, batch.x, train)
    up_vars = {**variables, **st}
    frozen, act_sg = jax.lax.stop_gradient((up_vars, act))
    onehot_BxC = jax.nn.one_hot(batch.labels_B, ctx.num_classes)
    count_C = onehot_BxC.sum(0)

    def perturbations(tables):
      return {p: gather_rows(onehot_BxC, t) for p, t in tables.items()}

    def upper_logits(variables_, a, tables):
      pert = perturbations(tables)
      extra = {p: pert[p] for p in points[1:]} or None
      return cut.upper(variables_, a + pert[point], train, extra)

    def loss_fn(tables):
      logits, _ = upper_logits(frozen, act_sg, tables)
      return optax.softmax_cross_entropy(logits, batch.targets_BxC).sum(), logits

    act_norm_B = sample_norms(act_sg)
    tables0 = {point: jnp.zeros((ctx.num_classes,) + act.shape[1:], act.dtype)}
    if len(points) > 1:
      # Shapes of the higher points come from one abstract evaluation (no FLOPs at run time).
      for p in points[1:]:
        shape = jax.eval_shape(lambda p=p: ctx.cut_fn(p).lower(frozen, batch.x, train)[0]).shape
        tables0[p] = jnp.zeros((ctx.num_classes,) + shape[1:], act.dtype)
    radius = radii(state, per_class_mean(onehot_BxC, act_norm_B))
    tables, clean_logits = class_pgd(loss_fn, tables0, count_C, state.sign_C, radius, steps,
                                     normalize, lowrank)
    logits, st2 = upper_logits(up_vars, act, tables)
    delta_B = gather_rows(onehot_BxC, tables[point])
    return Forward(logits, batch.targets_BxC, {**st, **st2},
                   perturbation_diagnostics(delta_B, act_sg, onehot_BxC, clean_logits, logits,
                                            batch.targets_BxC, state.sign_C))

  def refresh(state, stats, epoch):
    return classes.refresh_split(split, state, stats)

  return ActivationMethod(lambda: init_split, forward, refresh)
