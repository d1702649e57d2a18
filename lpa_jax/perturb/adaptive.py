"""Adaptive-layer LPA (SPEC §1 variant (b)): every ``M`` epochs move to the candidate point
``l* = argmax_l mean_i |ℓ_i(perturbed at l) − ℓ_i(clean)|``.

One compile, no retracing: each candidate is an ordinary :func:`~lpa_jax.perturb.lpa.lpa`
method, and the training forward is ``lax.switch`` over them on the active index held in the
state.  The statistic is measured during the epoch *before* each selection (``measure`` in the
state): on those steps a ``lax.cond`` also runs every candidate's LPA forward (outside the
gradient) on the batch and accumulates its mean ``|Δℓ|``.  At the selection epoch ``refresh``
takes the argmax and resets the sums.  So the extra cost is ``K`` LPA forwards per step for one
epoch in ``M``, and nothing otherwise.  The first candidate is active until the first selection.

Because a method's state normally changes only in ``refresh``, the forward hands its updated
state (the accumulated sums) back as ``aux["act_state"]``.  Wrap the step with
:func:`carry_act_state` (or have the train step pop that key) so it is kept:

>>> method = lpa_adaptive(ctx, ["stage2", "stage3"], every=5, split="balanced", eps=0.1)
>>> step = jax.jit(carry_act_state(make_train_step(method, identity_logits(), tx, cfg)))
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from lpa_jax.perturb.base import ActivationMethod, Context, Forward
from lpa_jax.perturb.lpa import lpa

STATE_KEY = "act_state"


class AdaptiveState(NamedTuple):
  index: jax.Array          # int32: the active candidate
  states: tuple             # each candidate's own LPA state (its class split)
  score_sum_K: jax.Array    # Σ over measured steps of mean_i |Δℓ_i|, per candidate
  score_n: jax.Array        # measured steps since the last selection
  measure: jax.Array        # bool: score every candidate on this epoch's steps


def _mean_abs_dloss(fwd: Forward) -> jax.Array:
  clean = optax.softmax_cross_entropy(fwd.aux["clean_logits"], fwd.targets_BxC)
  pert = optax.softmax_cross_entropy(fwd.logits_BxC, fwd.targets_BxC)
  return jnp.mean(jnp.abs(pert - clean))


SELECT = ("auto", "switch", "mask")


def lpa_adaptive(ctx: Context, candidates: Sequence[str], every: int, select: str = "auto",
                 **lpa_kwargs: Any) -> ActivationMethod:
  """LPA at the candidate point whose perturbation changes the loss most, re-chosen every
  ``every`` epochs.  ``lpa_kwargs`` go to :func:`~lpa_jax.perturb.lpa.lpa` for every candidate.

  ``select='switch'`` runs only the active candidate (``lax.switch``); ``'mask'`` runs every
  candidate and keeps the active one, which also scores them all for free.  XLA:CPU runs
  convolutions inside conditionals on a slow path (``lpa_jax.bench``), so ``'auto'`` picks
  ``mask`` on CPU and ``switch`` elsewhere.

  >>> m = lpa_adaptive(ctx, ["stage1", "stage2", "stage3"], every=10, split="longtail")
  >>> int(m.init().index)
  0
  """
  candidates = tuple(candidates)
  if not candidates:
    raise ValueError("lpa_adaptive needs at least one candidate point")
  if every < 1:
    raise ValueError(f"lpa_adaptive.every must be >= 1 epoch, got {every}")
  if select not in SELECT:
    raise ValueError(f"lpa_adaptive.select must be one of {SELECT}, got {select!r}")
  if select == "auto":
    select = "mask" if jax.default_backend() == "cpu" else "switch"
  if lpa_kwargs.get("extra_points"):
    raise ValueError("lpa_adaptive picks one point; extra_points (multi-layer) do not combine")
  for p in candidates:
    if p not in ctx.points:
      raise ValueError(f"Unknown candidate point {p!r}; valid points are: {', '.join(ctx.points)}")
  methods = [lpa(ctx, point=p, **lpa_kwargs) for p in candidates]
  k = len(methods)

  def init():
    return AdaptiveState(jnp.zeros((), jnp.int32), tuple(m.init() for m in methods),
                         jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32),
                         jnp.asarray(every == 1))

  def branch(i):
    def run(state, variables, batch, rng, train):
      fwd = methods[i].forward(state.states[i], variables, batch, rng, train)
      # lax.switch needs one pytree structure from every branch: a cut that leaves a
      # collection untouched passes the incoming one through.
      cols = [c for c in variables if c != "params"] if train else []
      return fwd._replace(model_state={c: fwd.model_state.get(c, variables[c]) for c in cols})
    return run

  branches = [branch(i) for i in range(k)]

  def score_all(state, variables, batch, rng, train):
    variables = jax.lax.stop_gradient(variables)  # scoring must not feed the parameter update
    return jnp.stack([_mean_abs_dloss(b(state, variables, batch, rng, train)) for b in branches])

  def forward(state, variables, batch, rng, train):
    if select == "mask":
      fwds = [b(state, variables, batch, rng, train) for b in branches]
      fwd = jax.tree.map(lambda *xs: jnp.stack(xs)[state.index], *fwds)
      scores_K = jnp.where(state.measure & train, jax.lax.stop_gradient(
          jnp.stack([_mean_abs_dloss(f) for f in fwds])), 0.0)
    else:
      # ``train`` is static (a Python bool): bind it rather than pass it as a traced operand.
      fwd = jax.lax.switch(state.index, [functools.partial(b, train=train) for b in branches],
                           state, variables, batch, rng)
      scores_K = jax.lax.cond(state.measure & train, functools.partial(score_all, train=train),
                              lambda *_: jnp.zeros((k,), jnp.float32), state, variables, batch,
                              rng)
    measured = (state.measure & train).astype(jnp.float32)
    new_state = state._replace(score_sum_K=state.score_sum_K + scores_K,
                               score_n=state.score_n + measured)
    aux = {**fwd.aux, STATE_KEY: new_state, "layer_index": state.index,
           "layer_score_K": new_state.score_sum_K / jnp.maximum(new_state.score_n, 1.0)}
    return fwd._replace(aux=aux)

  def refresh(state, stats, epoch):
    states = tuple(m.refresh(s, stats, epoch) for m, s in zip(methods, state.states))
    select = (epoch % every == 0) & (state.score_n > 0)
    best = jnp.argmax(state.score_sum_K).astype(jnp.int32)
    return AdaptiveState(
        index=jnp.where(select, best, state.index),
        states=states,
        score_sum_K=jnp.where(select, 0.0, state.score_sum_K),
        score_n=jnp.where(select, 0.0, state.score_n),
        measure=jnp.asarray((epoch + 1) % every == 0))

  return ActivationMethod(init, forward, refresh)


def carry_act_state(step_fn):
  """Wraps a train step so an activation method may update its state from ``forward``.

  The step puts ``forward``'s aux into its metrics; this moves ``aux["act_state"]`` from the
  metrics into ``state.act_state``.  (Equivalent to one line in the train step.)

  >>> step = jax.jit(carry_act_state(make_train_step(method, logit, tx, cfg)))
  """
  def step(state, batch):
    new_state, metrics = step_fn(state, batch)
    metrics = dict(metrics)
    if STATE_KEY in metrics:
      new_state = new_state.replace(act_state=metrics.pop(STATE_KEY))
    return new_state, metrics
  return step
