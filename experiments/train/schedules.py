"""Learning-rate schedules and the SGD optimiser of the SPEC protocols, built from optax."""
from __future__ import annotations

import optax

SCHEDULES = ("constant", "step", "cosine")


def make_schedule(cfg, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """``cfg``: ``lr``, ``schedule`` (constant/step/cosine), ``warmup_epochs``, ``decay_epochs``
  and ``decay_factors`` (cumulative factors, e.g. epochs (160, 180) with factors (0.01, 1e-4)).

  >>> from ml_collections import ConfigDict
  >>> lr = make_schedule(ConfigDict(dict(lr=0.1, schedule="step", warmup_epochs=0,
  ...     decay_epochs=(100, 150), decay_factors=(0.1, 0.01))), 391, 200)
  >>> [round(float(lr(epoch * 391)), 6) for epoch in (0, 99, 100, 150)]
  [0.1, 0.1, 0.01, 0.001]
  """
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  if len(cfg.decay_epochs) != len(cfg.decay_factors):
    raise ValueError("optim.decay_epochs and optim.decay_factors must have the same length, got "
                     f"{tuple(cfg.decay_epochs)} and {tuple(cfg.decay_factors)}")
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  total = num_epochs * steps_per_epoch
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(total - warmup, 1))
  elif cfg.schedule == "step":
    # optax multiplies boundaries' scales cumulatively; config factors are absolute.
    scales, prev = {}, 1.0
    for epoch, factor in zip(cfg.decay_epochs, cfg.decay_factors):
      scales[int(epoch * steps_per_epoch) - warmup] = factor / prev
      prev = factor
    main = optax.piecewise_constant_schedule(cfg.lr, scales)
  else:
    main = optax.constant_schedule(cfg.lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup), main],
                              [warmup])


def make_optimizer(cfg, schedule: optax.Schedule,
                   grad_pre: optax.GradientTransformation | None = None,
                   grad_post: optax.GradientTransformation | None = None):
  """``grad_pre`` acts on raw gradients (clipping, noise, GAF), ``grad_post`` on the momentum
  output (GAF on momentum); weight decay is coupled, as in the SPEC's SGD protocols."""
  parts = [grad_pre] if grad_pre is not None else []
  parts += [optax.add_decayed_weights(cfg.weight_decay),
            optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)]
  if grad_post is not None:
    parts.append(grad_post)
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)
