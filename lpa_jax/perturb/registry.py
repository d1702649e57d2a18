"""Builds perturbation methods by name from a config: one activation, one logit and one
gradient method, composable (e.g. ``activation=lpa, logit=lpl, gradient=sam``).

Each registry maps a name to ``factory(cfg, ctx)``, where ``cfg`` is the method's own config
block (``config.perturb.<name>``) and ``ctx`` the run :class:`~lpa_jax.perturb.base.Context`.
"""
from __future__ import annotations

from typing import Callable

import optax

from lpa_jax.perturb.base import (ActivationMethod, Context, LogitMethod, identity_logits,
                                  plain_forward)
from lpa_jax.perturb.lpa import lpa


def default_point(points) -> str:
  """The SPEC's default layer: the last stage before pooling (else the last hidden layer)."""
  points = list(points)
  if "features" in points:
    return points[points.index("features") - 1]
  return points[-2] if len(points) > 1 else points[-1]


def resolve_point(point: str, ctx: Context) -> str:
  return default_point(ctx.points) if point in ("auto", "default", None) else point


def _lpa(cfg, ctx: Context) -> ActivationMethod:
  return lpa(ctx, point=resolve_point(cfg.point, ctx), split=cfg.split, eps=cfg.eps,
             delta_eps=cfg.delta_eps, beta=cfg.beta, steps=cfg.steps, varied=cfg.varied,
             normalize=cfg.normalize, lowrank=cfg.lowrank or None,
             extra_points=tuple(cfg.extra_points), radius_mode=cfg.radius_mode,
             num_head=cfg.num_head, signs=cfg.signs)


ACTIVATION: dict[str, Callable[..., ActivationMethod]] = {
    "none": lambda cfg, ctx: plain_forward(ctx.cut_fn(ctx.points[-1])),
    "lpa": _lpa,
}
LOGIT: dict[str, Callable[..., LogitMethod]] = {
    "none": lambda cfg, ctx: identity_logits(),
}
# Gradient methods return (pre, post, needs_grad_fn, wrap): ``pre`` acts on raw gradients,
# ``post`` on the momentum output; ``wrap(tx)`` (if not None) wraps the whole optimiser (SAM).
GRADIENT: dict[str, Callable] = {
    "none": lambda cfg, ctx: (None, None, False, None),
}


def _lookup(table: dict, kind: str, name: str):
  if name not in table:
    raise ValueError(f"Unknown {kind} perturbation {name!r}; registered: {', '.join(table)}")
  return table[name]


def _block(pcfg, name):
  return getattr(pcfg, name, None) if name != "none" else None


def make_activation(pcfg, ctx: Context) -> ActivationMethod:
  name = pcfg.activation
  return _lookup(ACTIVATION, "activation", name)(_block(pcfg, name), ctx)


def make_logit(pcfg, ctx: Context) -> LogitMethod:
  name = pcfg.logit
  return _lookup(LOGIT, "logit", name)(_block(pcfg, name), ctx)


def make_gradient(pcfg, ctx: Context):
  name = pcfg.gradient
  return _lookup(GRADIENT, "gradient", name)(_block(pcfg, name), ctx)


def registered() -> dict[str, list[str]]:
  return {"activation": list(ACTIVATION), "logit": list(LOGIT), "gradient": list(GRADIENT)}
