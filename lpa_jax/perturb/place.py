"""Running an activation method inside a network cut at its point.

:func:`perturbed_apply` is the one function a training loop needs: it runs the layers below
the point once, hands the activation, the labels and the layers above (with frozen
parameters) to the method, and runs the layers above on the method's activation::

    out = perturbed_apply(method, cut, pstate, variables, x, labels, rng)
    loss = optax.softmax_cross_entropy(out.logits_BxC, out.targets_BxC).mean()
    # out.state: the method's new state; out.model_state: new BatchNorm statistics

:func:`place` binds a method to a cut for the library's own train step.  Methods built
already placed, because they choose among several points (Manifold Mixup, adaptive-layer LPA),
go through the same call with ``cut=None``::

    mixup = manifold_mixup([cut_a, cut_b], alpha=0.2)
    out = perturbed_apply(mixup, None, mstate, variables, x, labels, rng)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lpa_jax.perturb.base import (ActivationMethod, Batch, Forward, Perturbed, Placed,
                                  check_labels)
from lpa_jax.perturb.diagnostics import perturbation_diagnostics
from lpa_jax.perturb.hooks import Cut

MODEL_RNG = 1  # the model's own randomness (dropout) draws from fold_in(rng, MODEL_RNG)


def _rng_kw(rng):
  return {} if rng is None else {"rng": jax.random.fold_in(rng, MODEL_RNG)}


def perturbed_apply(method: ActivationMethod | Placed, cut: Cut | None, state, variables: dict,
                    x, labels_B, rng=None, train: bool = True, *, loss_fn: Callable | None = None,
                    targets=None) -> Forward:
  """One forward pass with ``method`` applied at ``cut``'s point.

  Args:
    method: an activation method (``init``/``apply``/``refresh``), e.g. ``lpa(...)``, or one
      built placed at its points (``manifold_mixup``, ``lpa_adaptive``).
    cut: the network split at the method's point (``cut_linen``, ``cut_nnx``, ``cut_staged``);
      ``None`` for a placed method.
    state: the method's state (``method.init()`` at first).
    variables: the model's variables (``{'params': ..., 'batch_stats': ...}``).
    x, labels_B: the batch; integer labels in ``[0, C)``, one per example of ``x`` (checked:
      the range where the labels are concrete, else counted in ``aux['invalid_labels']``).
    rng: a key for random methods (and the model's dropout, via ``fold_in(rng, 1)``).
    train: ``False`` is a plain forward (every method is the identity there).
    loss_fn: ``(logits, targets) -> loss_B``, the loss PGD follows (default cross-entropy);
      the diagnostics' ``loss_change_C`` is measured in it too.
    targets: soft targets (default ``one_hot(labels)``).

  How the method runs at its point — with or without the per-class diagnostics, with or
  without a random method's extra clean pass — is chosen once, by :func:`place`
  (``perturbed_apply(place(method, cut, clean_pass=False), None, ...)``); unplaced, a method
  runs with both.

  Returns:
    :class:`~lpa_jax.perturb.base.Forward` with the logits, targets (mixed by mixing
    methods), the model's new mutable state, the method's new state, the clean logits (if
    known) and the diagnostics.

  >>> out = perturbed_apply(lpa_method, cut, pstate, variables, x, y, rng)
  >>> loss = optax.softmax_cross_entropy(out.logits_BxC, out.targets_BxC).mean()
  >>> pstate = out.state
  """
  if isinstance(method, Placed):
    if cut is not None:
      raise TypeError("perturbed_apply: this method is already placed at its points (place(), "
                      "manifold_mixup, lpa_adaptive); pass cut=None")
    return method.forward(state, variables, Batch(x, labels_B, targets), rng, train,
                          loss_fn=loss_fn)
  if cut is None:
    raise TypeError(f"perturbed_apply: a {type(method).__name__} needs the Cut at its point; "
                    "only methods built placed (place(), manifold_mixup, lpa_adaptive) take "
                    "cut=None")
  return apply_at(method, cut, state, variables, x, labels_B, rng, train, loss_fn=loss_fn,
                  targets=targets)


def apply_at(method: ActivationMethod, cut: Cut, state, variables: dict, x, labels_B, rng=None,
             train: bool = True, *, loss_fn: Callable | None = None, targets=None,
             clean_logits=None, diagnostics: bool = True, clean_pass: bool = True,
             extra_shapes=None) -> Forward:
  """:func:`perturbed_apply` of an unplaced method, with the options :func:`place` fixes.

  Args (beyond :func:`perturbed_apply`'s):
    clean_logits: unperturbed logits if already known (skips the diagnostics' clean pass).
    diagnostics: add the per-class diagnostics to ``aux``.
    clean_pass: for methods that do not compute the clean logits themselves (dropout, noise,
      deep augmentation, mixup), run one extra no-gradient pass for them: the loss-change
      diagnostic and class statistics that must not see random noise need it.  Without it
      the diagnostics keep ``‖δ‖``, the expansive share and the sign, and ``clean_logits``
      is ``None``.
    extra_shapes: ``{point: per-example shape}`` at a multi-layer method's extra points.

  >>> fwd = apply_at(mix(0.2), cut, (), variables, x, y, rng, clean_logits=clean,
  ...                clean_pass=False)   # Manifold Mixup's branches share one clean pass
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
  r: Perturbed = method.apply(state, act, labels_B, upper, rng, train, loss_fn=loss_fn,
                              targets=targets, **kw)
  logits, st2 = cut.upper(up_vars, r.act, train, r.extra, **_rng_kw(rng))
  clean = r.clean_logits if r.clean_logits is not None else clean_logits
  aux = dict(r.aux)
  if train and diagnostics:
    if clean is None and clean_pass:
      clean = jax.lax.stop_gradient(upper(jax.lax.stop_gradient(act)))
    aux.update(perturbation_diagnostics(r.act, act, labels_B, targets.shape[-1], clean, logits,
                                        r.targets_BxC, clean_targets_BxC=targets,
                                        sign_C=r.aux.get("sign_C"), loss_fn=loss_fn))
  return Forward(logits, r.targets_BxC, {**st, **st2}, r.state, clean, aux)


def place(method: ActivationMethod, cut: Cut, shape_of: Callable | None = None,
          clean_pass: bool = True, diagnostics: bool = True) -> Placed:
  """Binds ``method`` to ``cut`` for the train step: ``forward(state, variables, batch, rng,
  train, loss_fn=None) -> Forward``.

  ``shape_of(variables, x, train) -> {point: per-example shape}`` supplies the activation
  shapes at a multi-layer method's extra points (abstract evaluation: no FLOPs at run time).
  ``clean_pass``, ``diagnostics``: see :func:`apply_at`.

  >>> placed = place(lpa(10, split="all_positive", eps=0.5), cut_staged(model, "stage3"))
  >>> fwd = placed.forward(placed.init(), variables, batch, rng, True)
  """
  def forward(state, variables, batch: Batch, rng, train, loss_fn=None):
    shapes = shape_of(variables, batch.x, train) if shape_of is not None else None
    return apply_at(method, cut, state, variables, batch.x, batch.labels_B, rng, train,
                    loss_fn=loss_fn, targets=batch.targets_BxC, extra_shapes=shapes,
                    clean_pass=clean_pass, diagnostics=diagnostics)
  return Placed(method.init, forward, method.refresh)
