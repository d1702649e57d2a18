"""Running a perturbation inside a network cut at its point.

:func:`perturbed_apply` is the one function a training loop needs: it runs the layers below
the point once, hands the activation, the labels and the layers above (with frozen
parameters) to the activation member, runs the layers above on its activation, applies the
logit members (a :func:`~lpa_jax.perturb.base.chain`) and returns the weighted training
loss::

    out = perturbed_apply(perturb, cut, pstate, variables, x, labels, rng)
    loss = out.loss          # out.state: the new perturbation state; out.model_state: BN stats

PGD at the point follows the loss the logit members define (their margins, shifts and
weights).  :func:`place` binds an activation method to a cut, with the options the library's
own train step fixes once; methods that choose among several points (Manifold Mixup,
adaptive-layer LPA) are built placed, and run with ``cut=None``::

    mixup = manifold_mixup([cut_a, cut_b], alpha=0.2)
    out = perturbed_apply(mixup, None, mstate, variables, x, labels, rng)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lpa_jax.perturb.base import (Out, Perturbation, check_extra, check_labels, default_loss,
                                  invalid_label_count, join_state, pgd_loss_of, split_chain)
from lpa_jax.perturb.diagnostics import perturbation_diagnostics
from lpa_jax.perturb.foreign import nnx_functional
from lpa_jax.perturb.hooks import Cut, full_apply

MODEL_RNG = 1  # the model's own randomness (dropout) draws from fold_in(rng, MODEL_RNG)


def _rng_kw(rng):
  return {} if rng is None else {"rng": jax.random.fold_in(rng, MODEL_RNG)}


def perturbed_apply(perturb: Perturbation, cut: Cut | None, state, variables: dict, x,
                    labels_B, rng=None, train: bool = True, *, targets=None, step=0,
                    loss_fn: Callable | None = None) -> Out:
  """One training forward pass with ``perturb`` applied, and its loss.

  Args:
    perturb: a perturbation or a :func:`~lpa_jax.perturb.base.chain` of one activation (or
      network) member and logit members, e.g. ``lpa(...)``,
      ``chain(lpa(...), logit_adjust(counts))``, ``manifold_mixup([...])``, ``lpl(...)``.
    cut: the network split at the activation member's point (``cut_linen``, ``cut_nnx``,
      ``cut_staged``); ``None`` for a member built placed (``place``, ``manifold_mixup``,
      ``lpa_adaptive``).  A logit-only perturbation needs a cut for the plain forward.
    state: the perturbation's state (``perturb.init()`` at first), or an ``nnx.Variable``
      holding it, which is then updated in place (``Out.state`` is the new state either way).
    variables: the model's variables (``{'params': ..., 'batch_stats': ...}``), or an NNX
      model itself (inside ``nnx.value_and_grad``): its new BatchNorm statistics and RNG
      counters are then written back into it, as ``model(x)`` does.
    x, labels_B: the batch; integer labels in ``[0, C)``, one per example of ``x`` (checked
      where concrete; under ``jit`` counted in ``aux['invalid_labels']`` and given no ``δ``).
    rng: a key for random methods (and the model's dropout, via ``fold_in(rng, 1)``).
    train: ``False`` is a plain forward (every method is the identity there).
    targets: soft targets (default ``one_hot(labels)``).
    step: the global step (LDAM's deferred re-weighting reads it).
    loss_fn: ``(logits, targets) -> loss_B``, the loss PGD follows when the perturbation has
      no logit members (default cross-entropy); with logit members, theirs.

  Returns:
    :class:`~lpa_jax.perturb.base.Out`: ``loss`` (the mean of ``weights_B · ℓ``), ``x`` (=
    ``logits_BxC``: the logits trained on), ``targets_BxC`` (mixed by mixing methods),
    ``state``, ``model_state``, ``clean_logits`` (if known) and the diagnostics ``aux``.

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb import chain, cut_staged, lpa, lpl
  >>> model = get_model("mlp", 3, widths=(8,))
  >>> x, y, rng = jnp.ones((8, 2, 2, 1)), jnp.arange(8) % 3, jax.random.key(0)
  >>> variables = model.init(rng, x)
  >>> perturb, cut = chain(lpa(3, eps=0.05), lpl(3)), cut_staged(model, "hidden1")
  >>> pstate = perturb.init()
  >>> @jax.jit                               # inside your jitted train step
  ... def forward(variables, pstate, x, y, rng):
  ...   return perturbed_apply(perturb, cut, pstate, variables, x, y, rng)
  >>> out = forward(variables, pstate, x, y, rng)
  >>> loss, pstate = out.loss, out.state
  >>> loss.shape, out.x.shape
  ((), (8, 3))
  """
  if isinstance(state, nnx.Variable):  # NNX style: the state object is updated in place
    out = perturbed_apply(perturb, cut, state.get_value(), variables, x, labels_B, rng, train,
                          targets=targets, step=step, loss_fn=loss_fn)
    state.set_value(out.state)
    return out
  if isinstance(variables, nnx.Module):  # an NNX model in place of its variables
    return _perturbed_apply_nnx(perturb, cut, state, variables, x, labels_B, rng, train,
                                targets=targets, step=step, loss_fn=loss_fn)
  inner, inner_state, logit, logit_state = split_chain(perturb, state)
  if inner is None or inner.level == "activation":
    if cut is None:
      what = "a logit perturbation" if inner is None else "an activation method"
      raise TypeError(f"perturbed_apply: {what} needs the Cut of the network (cut_linen, "
                      "cut_nnx, cut_staged); only methods built placed (place(), "
                      "manifold_mixup, lpa_adaptive) take cut=None")
  elif cut is not None:
    raise TypeError("perturbed_apply: this method is already placed at its points (place(), "
                    "manifold_mixup, lpa_adaptive); pass cut=None")
  if targets is None:
    num_classes = _num_classes(inner, cut, variables, x, labels_B)
    check_labels(labels_B, num_classes, "perturbed_apply", x)
    targets = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  if not logit.info.get("identity"):
    loss_fn = pgd_loss_of(logit, logit_state, labels_B, targets, step)
  if inner is None:
    logits, model_state = full_apply(cut, variables, x, train, **_rng_kw(rng))
    fwd = Out(logits, (), targets, model_state=model_state)
  elif inner.level == "network":
    fwd = inner.apply(inner_state, x, labels=labels_B, variables=variables, rng=rng,
                      train=train, loss_fn=loss_fn, targets=targets)
  else:
    fwd = apply_at(inner, cut, inner_state, variables, x, labels_B, rng, train,
                   loss_fn=loss_fn, targets=targets)
  # Class statistics read the clean logits when the activation method computed them (LPA,
  # adversarial, or a clean pass some class split needs), else the training ones.
  clean_BxC = jax.lax.stop_gradient(fwd.clean_logits if fwd.clean_logits is not None
                                    else fwd.x)
  lout = logit.apply(logit_state, fwd.x, labels=labels_B, targets=fwd.targets_BxC, step=step,
                     clean_logits=clean_BxC)
  loss_B = default_loss(lout.x, fwd.targets_BxC)
  if lout.weights_B is not None:
    loss_B = lout.weights_B * loss_B
  aux = {**fwd.aux, **lout.aux}
  aux.setdefault("invalid_labels", invalid_label_count(labels_B, targets.shape[-1]))
  # The model's collections after this pass, all of them (new where it ran on real data).
  model_state = {**{c: v for c, v in variables.items() if c != "params"}, **fwd.model_state}
  return Out(lout.x, join_state(perturb, fwd.state, lout.state), fwd.targets_BxC,
             lout.weights_B, clean_BxC, aux, None, model_state, jnp.mean(loss_B))


def _perturbed_apply_nnx(perturb, cut, state, model, x, labels_B, rng, train, **kw) -> Out:
  """:func:`perturbed_apply` on an NNX model: run on its variables, then write the new
  BatchNorm statistics and RNG counters back into the model, as ``model(x)`` would."""
  _, variables = nnx_functional(model)
  out = perturbed_apply(perturb, cut, state, variables, x, labels_B, rng, train, **kw)
  if out.model_state:
    nnx.update(model, *out.model_state.values())
  return out


def _num_classes(inner, cut, variables, x, labels_B) -> int:
  """The number of logits, by abstract evaluation (no FLOPs)."""
  if cut is None:
    return jax.eval_shape(lambda v, a, y: inner.apply(inner.init(), a, labels=y, variables=v,
                                                      train=False).x,
                          variables, x, labels_B).shape[-1]
  # Training mode, as the pass it precedes: some models update BatchNorm statistics always.
  return jax.eval_shape(lambda v, a: full_apply(cut, v, a, True, rng=jax.random.PRNGKey(0))[0],
                        variables, x).shape[-1]


def apply_at(method: Perturbation, cut: Cut, state, variables: dict, x, labels_B, rng=None,
             train: bool = True, *, loss_fn: Callable | None = None, targets=None,
             clean_logits=None, diagnostics: bool = True, clean_pass: bool = True,
             extra_shapes=None) -> Out:
  """An activation method's forward pass at ``cut``, with the options :func:`place` fixes
  (no logit members, no loss: :func:`perturbed_apply` adds those).

  Args (beyond :func:`perturbed_apply`'s):
    clean_logits: unperturbed logits if already known (skips the diagnostics' clean pass).
    diagnostics: add the per-class diagnostics to ``aux``.
    clean_pass: for methods that do not compute the clean logits themselves (dropout, noise,
      deep augmentation, mixup), run one extra no-gradient pass for them: the loss-change
      diagnostic and class statistics that must not see random noise need it.  Without it
      the diagnostics keep ``‖δ‖``, the expansive share and the sign, and ``clean_logits``
      is ``None``.
    extra_shapes: ``{point: per-example shape}`` at a multi-layer method's extra points.

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb.activation import dropout
  >>> from lpa_jax.perturb.hooks import cut_staged, full_apply
  >>> model = get_model("mlp", 3, widths=(8,))
  >>> x, y, rng = jnp.ones((8, 2, 2, 1)), jnp.arange(8) % 3, jax.random.key(0)
  >>> variables = model.init(rng, x)
  >>> cut = cut_staged(model, "hidden1")
  >>> @jax.jit
  ... def branch(variables, x, y, rng, clean):   # the clean logits are known: no extra pass
  ...   return apply_at(dropout(0.2), cut, (), variables, x, y, rng, clean_logits=clean,
  ...                   clean_pass=False)      # (Manifold Mixup's branches share one)
  >>> fwd = branch(variables, x, y, rng, full_apply(cut, variables, x, True)[0])
  >>> fwd.x.shape, fwd.targets_BxC.shape   # logits, targets
  ((8, 3), (8, 3))
  """
  act, st = cut.lower(variables, x, train, **_rng_kw(rng))
  up_vars = {**variables, **st}
  frozen = jax.lax.stop_gradient(up_vars)

  def upper(a, extra=None):
    return cut.upper(frozen, a, train, extra, **_rng_kw(rng))[0]

  # Abstract evaluation only: tells the number of logits without running anything.
  num_classes = jax.eval_shape(upper, act).shape[-1] if targets is None else targets.shape[-1]
  check_labels(labels_B, num_classes, "perturbed_apply", x)
  if targets is None:
    targets = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  kw = {"extra_shapes": extra_shapes} if extra_shapes else {}
  r = method.apply(state, act, labels=labels_B, upper=upper, rng=rng, train=train,
                   loss_fn=loss_fn, targets=targets, **kw)
  logits, st2 = cut.upper(up_vars, r.x, train, r.extra, **_rng_kw(rng))
  clean = r.clean_logits if r.clean_logits is not None else clean_logits
  aux = dict(r.aux)
  if train and diagnostics:
    if clean is None and clean_pass:
      clean = jax.lax.stop_gradient(upper(jax.lax.stop_gradient(act)))
    aux.update(perturbation_diagnostics(r.x, act, labels_B, targets.shape[-1], clean, logits,
                                        r.targets_BxC, clean_targets_BxC=targets,
                                        sign_C=r.aux.get("sign_C"), loss_fn=loss_fn))
  return Out(logits, r.state, r.targets_BxC, None, clean, aux, None, {**st, **st2})


def place(method: Perturbation, cut: Cut, shape_of: Callable | None = None,
          clean_pass: bool = True, diagnostics: bool = True) -> Perturbation:
  """Binds an activation method to ``cut``: a network-level perturbation (``apply(state, x,
  *, labels, variables, rng, train, loss_fn, targets) -> Out`` with the logits), run by
  :func:`perturbed_apply` with ``cut=None``.

  ``shape_of(variables, x, train) -> {point: per-example shape}`` supplies the activation
  shapes at a multi-layer method's extra points (abstract evaluation: no FLOPs at run time).
  ``clean_pass``, ``diagnostics``: see :func:`apply_at`.

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb import cut_staged, lpa
  >>> model = get_model("mlp", 3, widths=(8,))
  >>> x, y, rng = jnp.ones((8, 2, 2, 1)), jnp.arange(8) % 3, jax.random.key(0)
  >>> variables = model.init(rng, x)
  >>> placed = place(lpa(3, split="all_positive", eps=0.5), cut_staged(model, "hidden1"))
  >>> forward = jax.jit(lambda v, s, x, y, rng: perturbed_apply(placed, None, s, v, x, y, rng))
  >>> out = forward(variables, placed.init(), x, y, rng)
  >>> placed.level, np.asarray(out.aux["delta_norm_C"]).round(3)   # ‖δ_c‖ = ε
  ('network', array([0.5, 0.5, 0.5], dtype=float32))
  """
  if method.level != "activation" and not method.info.get("identity"):
    raise TypeError(f"place: a {method.level}-level perturbation has no point to be placed at")

  def apply(state, x, *, labels, variables, rng=None, train=True, loss_fn=None, targets=None,
            **extra):
    check_extra("place", extra)
    shapes = shape_of(variables, x, train) if shape_of is not None else None
    return apply_at(method, cut, state, variables, x, labels, rng, train, loss_fn=loss_fn,
                    targets=targets, extra_shapes=shapes, clean_pass=clean_pass,
                    diagnostics=diagnostics)
  return Perturbation(method.init, apply, method.refresh, "network",
                      info={**method.info, "point": cut.point})
