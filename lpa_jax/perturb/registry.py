"""Builds perturbation methods by name from a config: one activation, one logit and one
gradient method, composable (e.g. ``activation=lpa, logit=lpl, gradient=sam``).

Each registry maps a name to ``factory(cfg, ctx)``, where ``cfg`` is the method's own config
block (``config.perturb.<name>``) and ``ctx`` the run :class:`~lpa_jax.perturb.base.Context`.
"""
from __future__ import annotations

from typing import Callable

import optax

from lpa_jax.perturb import activation, gradient, logit
from lpa_jax.perturb.base import (ActivationMethod, Context, GradientMethod, LogitMethod,
                                  identity_logits, plain_forward)
from lpa_jax.perturb.adaptive import lpa_adaptive
from lpa_jax.perturb.lpa import lpa


def default_point(points) -> str:
  """The SPEC's default layer: the last stage before pooling (else the last hidden layer)."""
  points = list(points)
  if "features" in points:
    return points[points.index("features") - 1]
  return points[-2] if len(points) > 1 else points[-1]


def resolve_point(point: str, ctx: Context) -> str:
  return default_point(ctx.points) if point in ("auto", "default", None) else point


def default_mixup_points(points) -> tuple[str, ...]:
  """Manifold Mixup's layer set: the input and up to two points below the default layer
  (the paper's {0, 1, 2} for ResNets; a stem is skipped)."""
  below = list(points)[:list(points).index(default_point(points))]
  return ("input",) + tuple(p for p in below if p != "stem")[:2]


def _lpa_kwargs(cfg) -> dict:
  return dict(split=cfg.split, eps=cfg.eps, delta_eps=cfg.delta_eps, beta=cfg.beta,
              steps=cfg.steps, varied=cfg.varied, normalize=cfg.normalize,
              lowrank=cfg.lowrank or None, radius_mode=cfg.radius_mode, num_head=cfg.num_head,
              signs=cfg.signs)


def _lpa(cfg, ctx: Context) -> ActivationMethod:
  return lpa(ctx, point=resolve_point(cfg.point, ctx), extra_points=tuple(cfg.extra_points),
             **_lpa_kwargs(cfg))


def _lpa_adaptive(cfg, ctx: Context) -> ActivationMethod:
  """Adaptive-layer LPA; its candidates default to every point below the logits."""
  candidates = tuple(cfg.candidates) or tuple(ctx.points[:-1])
  return lpa_adaptive(ctx, candidates, cfg.every, select=cfg.select, **_lpa_kwargs(cfg))


def _at_point(factory, *fields):
  """A registry entry for a single-point method taking ``fields`` from its config block."""
  def make(cfg, ctx: Context) -> ActivationMethod:
    return factory(ctx, resolve_point(cfg.point, ctx), **{f: cfg[f] for f in fields})
  return make


def _mixup(cfg, ctx: Context) -> ActivationMethod:
  points = tuple(cfg.points) or default_mixup_points(ctx.points)
  return activation.manifold_mixup(ctx, points, alpha=cfg.alpha, select=cfg.select)


def _class_level(factory, *fields):
  def make(cfg, ctx: Context):
    return factory(ctx, split=cfg.split, num_head=cfg.num_head, signs=cfg.signs,
                   **{f: cfg[f] for f in fields})
  return make


def _fields(factory, *fields):
  return lambda cfg, ctx: factory(**{f: cfg[f] for f in fields})


ACTIVATION: dict[str, Callable[..., ActivationMethod]] = {
    "none": lambda cfg, ctx: plain_forward(ctx.cut_fn(ctx.points[-1])),
    "lpa": _lpa,
    "lpa_adaptive": _lpa_adaptive,
    "dropout": _at_point(activation.dropout, "rate"),
    "noise": _at_point(activation.noise, "sigma", "mode"),
    "manifold_mixup": _mixup,
    "adversarial": _at_point(activation.adversarial, "eps", "beta", "method", "steps"),
    "deep_augmentation": _at_point(activation.deep_augmentation, "mode", "rate", "pca_frac"),
}
LOGIT: dict[str, Callable[..., LogitMethod]] = {
    "none": lambda cfg, ctx: identity_logits(),
    "lpl": _class_level(logit.lpl, "alpha", "steps", "varied", "steps_min", "steps_max",
                        "normalize"),
    "logit_adjust": lambda cfg, ctx: logit.logit_adjust(ctx, tau=cfg.tau, mode=cfg.mode),
    "ldam": lambda cfg, ctx: logit.ldam(
        ctx, max_margin=cfg.max_margin, scale=cfg.scale, drw=cfg.drw, drw_beta=cfg.drw_beta,
        drw_fraction=cfg.drw_fraction, batch_normalize=cfg.batch_normalize),
}
# Gradient methods return a GradientMethod: ``pre`` acts on raw gradients, ``post`` on the
# momentum output, ``wrap(tx)`` wraps the whole optimiser (SAM), ``logit`` edits logit gradients.
GRADIENT: dict[str, Callable[..., GradientMethod]] = {
    "none": lambda cfg, ctx: GradientMethod(),
    "lpg": _class_level(gradient.lpg, "eps", "delta_eps", "varied"),
    "gaf": _fields(gradient.gaf, "alpha", "beta", "form", "where"),
    "sam": _fields(gradient.sam, "rho"),
    "clip": _fields(gradient.clip, "max_norm"),
    "grad_noise": _fields(gradient.grad_noise, "eta", "gamma", "seed"),
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


def make_gradient(pcfg, ctx: Context) -> GradientMethod:
  name = pcfg.gradient
  return _lookup(GRADIENT, "gradient", name)(_block(pcfg, name), ctx)


def registered() -> dict[str, list[str]]:
  return {"activation": list(ACTIVATION), "logit": list(LOGIT), "gradient": list(GRADIENT)}
