"""Adaptive-layer LPA (SPEC §1 variant (b)): every ``M`` epochs move to the candidate point
``l* = argmax_l mean_i |ℓ_i(perturbed at l) − ℓ_i(clean)|``.

One compile, no retracing: each candidate is an ordinary :func:`~lpa_jax.perturb.lpa.lpa`
method, and the training forward is ``lax.switch`` over them on the active index held in the
state.  The statistic is measured during the epoch *before* each selection (``measure`` in the
state): on those steps a ``lax.cond`` also runs every candidate's LPA forward (outside the
gradient) on the batch and accumulates its mean ``|Δℓ|``.  At the selection epoch ``refresh``
takes the argmax and resets the sums.  So the extra cost is ``K`` LPA forwards per step for one
epoch in ``M``, and nothing otherwise.  The first candidate is active until the first selection.

The forward returns its updated state (the accumulated scores) explicitly, like every method.

>>> from lpa_jax.models import get_model
>>> from lpa_jax.perturb import cut_staged, lpa, lpa_adaptive
>>> model = get_model("cnn", 10, widths=(8, 16, 32))
>>> method = lpa_adaptive([(lpa(10), cut_staged(model, p)) for p in ("stage2", "stage3")],
...                       every=5)
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lpa_jax.perturb.base import Batch, Out, Perturbation, check_extra, default_loss
from lpa_jax.perturb.hooks import Cut, full_apply
from lpa_jax.perturb.place import apply_at


class AdaptiveState(NamedTuple):
  index: jax.Array          # int32: the active candidate
  states: tuple             # each candidate's own LPA state (its class split)
  score_sum_K: jax.Array    # Σ over measured steps of mean_i |Δℓ_i|, per candidate
  score_n: jax.Array        # measured steps since the last selection
  measure: jax.Array        # bool: score every candidate on this epoch's steps


def _mean_abs_dloss(fwd: Out) -> jax.Array:
  clean = default_loss(fwd.clean_logits, fwd.targets_BxC)
  pert = default_loss(fwd.logits_BxC, fwd.targets_BxC)
  return jnp.mean(jnp.abs(pert - clean))


SELECT = ("auto", "switch", "mask")


def lpa_adaptive(candidates: Sequence[tuple[Perturbation, Cut]], every: int,
                 select: str = "auto") -> Perturbation:
  """LPA at the candidate point whose perturbation changes the loss most, re-chosen every
  ``every`` epochs.  ``candidates`` pairs an LPA method (one per point, each with its own
  ``depth``) with the cut at its point.

  ``select='switch'`` runs only the active candidate (``lax.switch``); ``'mask'`` runs every
  candidate and keeps the active one, which also scores them all for free.  XLA:CPU runs
  convolutions inside conditionals on a slow path, so ``'auto'`` picks ``mask`` on CPU and
  ``switch`` elsewhere; the choice made is recorded as ``aux['layer_select_switch']``.

  Returns a network-level perturbation (it runs the network at the active point): call it
  through ``perturbed_apply(m, None, state, variables, x, labels, rng)``.

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb import cut_staged, lpa
  >>> model = get_model("cnn", 10, widths=(8, 16, 32))
  >>> cut1, cut2 = cut_staged(model, "stage2"), cut_staged(model, "stage3")
  >>> m = lpa_adaptive([(lpa(10, depth=2), cut1), (lpa(10, depth=1), cut2)], every=10)
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
  if any(m.info.get("extra_points") for m, _ in candidates):
    raise ValueError("lpa_adaptive picks one point; extra_points (multi-layer) do not combine")
  init = lambda: AdaptiveState(  # noqa: E731
      jnp.zeros((), jnp.int32), tuple(m.init() for m, _ in candidates),
      jnp.zeros((len(candidates),), jnp.float32), jnp.zeros((), jnp.float32),
      jnp.asarray(every == 1))
  def apply(state, x, *, labels, variables, rng=None, train=True, loss_fn=None, targets=None,
            **unused):
    check_extra("lpa_adaptive", unused)
    if targets is None:
      n = jax.eval_shape(lambda v, a: full_apply(candidates[0][1], v, a, False)[0], variables,
                         x).shape[-1]
      targets = jax.nn.one_hot(labels, n, dtype=jnp.float32)
    return _forward(candidates, select, state, variables, Batch(x, labels, targets), rng,
                    train, loss_fn)
  return Perturbation(init, apply, functools.partial(_refresh, candidates, every), "network")


def _branch(candidates, i, state, variables, batch, rng, train, loss_fn=None) -> Out:
  """Candidate ``i``'s LPA forward, with every candidate's state (its own updated)."""
  method, cut = candidates[i]
  fwd = apply_at(method, cut, state.states[i], variables, batch.x, batch.labels_B, rng, train,
                 loss_fn=loss_fn, targets=batch.targets_BxC)
  # lax.switch needs one pytree structure from every branch: a cut that leaves a collection
  # untouched passes the incoming one through.
  cols = [c for c in variables if c != "params"] if train else []
  states = tuple(fwd.state if j == i else s for j, s in enumerate(state.states))
  return fwd._replace(model_state={c: fwd.model_state.get(c, variables[c]) for c in cols},
                      state=states)


def _score_all(candidates, state, variables, batch, rng, train, loss_fn):
  variables = jax.lax.stop_gradient(variables)  # scoring must not feed the parameter update
  return jnp.stack([_mean_abs_dloss(_branch(candidates, i, state, variables, batch, rng, train,
                                            loss_fn)) for i in range(len(candidates))])


def _forward(candidates, select, state, variables, batch, rng, train, loss_fn=None) -> Out:
  k = len(candidates)
  if not train:
    return _branch(candidates, 0, state, variables, batch, rng, False)._replace(state=state)
  branches = [functools.partial(_branch, candidates, i, train=train, loss_fn=loss_fn)
              for i in range(k)]
  if select == "mask":
    fwds = [b(state, variables, batch, rng) for b in branches]
    fwd = jax.tree.map(lambda *xs: jnp.stack(xs)[state.index], *fwds)
    scores_K = jnp.where(state.measure, jax.lax.stop_gradient(
        jnp.stack([_mean_abs_dloss(f) for f in fwds])), 0.0)
  else:
    fwd = jax.lax.switch(state.index, branches, state, variables, batch, rng)
    scores_K = jax.lax.cond(state.measure,
                            functools.partial(_score_all, candidates, train=train,
                                              loss_fn=loss_fn),
                            lambda *_: jnp.zeros((k,), jnp.float32), state, variables, batch, rng)
  new_state = state._replace(states=fwd.state, score_sum_K=state.score_sum_K + scores_K,
                             score_n=state.score_n + state.measure.astype(jnp.float32))
  aux = {**fwd.aux, "layer_index": state.index,
         "layer_score_K": new_state.score_sum_K / jnp.maximum(new_state.score_n, 1.0),
         "layer_select_switch": jnp.float32(select == "switch")}
  return fwd._replace(state=new_state, aux=aux)


def _refresh(candidates, every, state, stats=None, epoch=0) -> AdaptiveState:
  if stats is None:  # every candidate re-splits from what the active one saw this epoch
    stats = jax.tree.map(lambda *xs: jnp.stack(xs)[state.index],
                         *(s.stats for s in state.states))
  states = tuple(m.refresh(s, stats, epoch) for (m, _), s in zip(candidates, state.states))
  choose = (epoch % every == 0) & (state.score_n > 0)
  best = jnp.argmax(state.score_sum_K).astype(jnp.int32)
  return AdaptiveState(
      index=jnp.where(choose, best, state.index),
      states=states,
      score_sum_K=jnp.where(choose, 0.0, state.score_sum_K),
      score_n=jnp.where(choose, 0.0, state.score_n),
      measure=jnp.asarray((epoch + 1) % every == 0))
