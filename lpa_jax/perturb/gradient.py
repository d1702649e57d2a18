"""The gradient-level family (SPEC §3): LPG and GAF; SAM, clipping and noise are optax's.

GAF is a plain ``optax.GradientTransformation``: chain it into your optimiser where it should
act — before it on the raw gradients, or after the momentum trace on its output::

    tx = optax.chain(gaf(0.1, 20.0), optax.sgd(0.1, momentum=0.9))        # raw gradients
    tx = optax.chain(optax.trace(0.9), gaf(0.1, 20.0), optax.sgd(0.1))    # momentum output

The rest of the gradient level is optax's own, used as it is: ``optax.clip_by_global_norm``,
``optax.add_noise`` (annealed gradient noise) and ``optax.contrib.sam`` (its ``update`` wants
the ``grad_fn=`` of the loss, which lpa_jax's train step passes to every optimiser that takes
extra arguments).  LPG edits the per-example *logit* gradients with a ``jax.custom_vjp``, so it
is a logit-level perturbation (:func:`lpg`): chain it last among them,
``chain(logit_adjust(counts), lpg(10))``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lpa_jax.perturb import classes
from lpa_jax.perturb.base import (Out, Perturbation, check_class_counts, check_finite_params,
                                  check_num_classes, logit_method, unit_weights)
from lpa_jax.perturb.logit import observe
from lpa_jax.perturb.pgd import EPS
from lpa_jax.perturb.tables import row_norms

GAF_FORMS = ("atan", "tanh", "log")


@jax.custom_vjp
def perturb_logit_grad(logits_BxC, onehot_BxC, sign_C, radius_C):
  """Identity on the logits; the backward adds ``δ_{y_i}`` to each sample's logit gradient.

  ``δ_c = s_c·ε_c·ĝ_c/‖ĝ_c‖`` with ``ĝ_c`` the class-mean per-example gradient.  For ``N``
  classes ``ε_c`` is capped at ``‖ĝ_c‖`` so dampening never reverses the gradient **(ours)**.
  """
  return logits_BxC


def _lpg_fwd(logits_BxC, onehot_BxC, sign_C, radius_C):
  return logits_BxC, (onehot_BxC, sign_C, radius_C)


def _lpg_bwd(res, ct_BxC):
  onehot_BxC, sign_C, radius_C = res
  # The incoming cotangent is ∂(mean_i w_i ℓ_i)/∂z_i = w_i g_i / B: undo the 1/B so that ε_c is
  # measured in per-example gradient units, as in the SPEC, then restore it.
  b = ct_BxC.shape[0]
  g_BxC = b * ct_BxC
  count_C = onehot_BxC.sum(0)
  mean_CxC = (onehot_BxC.T @ g_BxC) / jnp.maximum(count_C, 1.0)[:, None]
  norm_C = row_norms(mean_CxC)
  mag_C = jnp.where(sign_C > 0, radius_C, jnp.minimum(radius_C, norm_C))
  delta_CxC = (sign_C * mag_C / (norm_C + EPS))[:, None] * mean_CxC
  delta_CxC = jnp.where((count_C > 0)[:, None], delta_CxC, 0.0)
  out = (g_BxC + onehot_BxC @ delta_CxC) / b
  return out, jnp.zeros_like(onehot_BxC), jnp.zeros_like(sign_C), jnp.zeros_like(radius_C)


perturb_logit_grad.defvjp(_lpg_fwd, _lpg_bwd)


def lpg(num_classes: int, *, split: str = "balanced", eps: float = 0.1,
        delta_eps: float = 0.1, varied: bool = True, class_counts=None,
        num_head: int | None = None, signs=None) -> Perturbation:
  """LPG (SPEC §3, rule ours) as a logit method: forward unchanged, class-mean logit gradients
  of ``P`` classes grow by ``ε_c`` in norm and those of ``N`` classes shrink by up to ``ε_c``.

  ``ε_c = ε + Δε·|τ − q_c|`` (varied) or ``ε``; ``split``, ``class_counts``, ``num_head`` and
  ``signs`` as in :func:`~lpa_jax.perturb.logit.lpl`.  Chain it after the logit methods whose
  output gradient it edits: ``chain(logit_adjust(counts), lpg(10))``.  PGD (LPA's, in a
  chain) follows the training loss, which LPG leaves unchanged: its ``loss_apply`` is the
  identity.

  >>> counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]   # CIFAR-10-LT
  >>> m = lpg(10, split="longtail", class_counts=counts, eps=0.1)
  >>> z = m.apply(m.init(), jnp.zeros((2, 10)), labels=jnp.array([0, 9])).x
  >>> bool((z == 0).all())   # the forward is unchanged; the backward is LPG's
  True
  """
  num_classes = check_num_classes("lpg", num_classes)
  class_counts = check_class_counts("lpg", class_counts, num_classes, required=False)
  check_finite_params("lpg", eps=eps, delta_eps=delta_eps)
  if eps < 0 or delta_eps < 0:
    raise ValueError(f"lpg needs eps >= 0 and delta_eps >= 0, got eps={eps}, "
                     f"delta_eps={delta_eps}")
  init_split = classes.method_split("lpg", split, num_classes, class_counts, signs, num_head)

  def apply(state, logits_BxC, batch, step):
    onehot_BxC = jax.nn.one_hot(batch.labels_B, num_classes, dtype=logits_BxC.dtype)
    radius_C = classes.class_radii(state.split, eps, delta_eps, 1.0, 0, varied)
    out = perturb_logit_grad(logits_BxC, onehot_BxC, state.sign_C, radius_C)
    return Out(out, observe(state, logits_BxC, batch), None, unit_weights(logits_BxC),
               aux={"lpg_radius_C": radius_C * (state.sign_C != 0)})

  def refresh(state, stats=None, epoch=None):
    return state.refreshed(split, stats)

  def pgd_apply(state, logits_BxC, batch, step):
    # PGD follows the training loss, which LPG leaves unchanged (it edits only gradients).
    return Out(logits_BxC, state, None, unit_weights(logits_BxC))

  return logit_method(lambda: classes.split_state(init_split), apply, refresh,
                      loss_batch=pgd_apply)


def gaf_fn(alpha: float = 0.1, beta: float = 20.0, form: str = "atan"):
  """The element-wise activation ``g ↦ α·atan(βg)`` (or ``α·tanh(βg)``,
  ``sign(g)·α·log(1+β|g|)``): slope ``αβ`` at 0; atan bounded by ``απ/2``, tanh by ``α``."""
  if form not in GAF_FORMS:
    raise ValueError(f"gaf.form must be one of {GAF_FORMS}, got {form!r}")
  return {"atan": lambda g: alpha * jnp.arctan(beta * g),
          "tanh": lambda g: alpha * jnp.tanh(beta * g),
          "log": lambda g: jnp.sign(g) * alpha * jnp.log1p(beta * jnp.abs(g))}[form]


def _activation_transform(alpha: float = 0.1, beta: float = 20.0,
                        form: str = "atan") -> optax.GradientTransformation:
  """GAF (Chen, Jin et al. 2021) as a stateless optax transform.

  """
  fn = gaf_fn(alpha, beta, form)
  return optax.stateless(lambda updates, params=None: jax.tree.map(fn, updates))


def gaf(alpha: float = 0.1, beta: float = 20.0, form: str = "atan",
        unit_slope: bool = False) -> optax.GradientTransformation:
  """GAF (Chen, Jin et al. 2021) as an optax transform: ``g ↦ α·atan(βg)`` element-wise.

  Chain it before the optimiser for the raw gradients, or after the momentum trace for its
  output (the paper's two places; lpa_jax's config says which with ``perturb.gaf.where``).
  The published ``(α, β) = (0.1, 20)`` has slope ``αβ = 2`` at small gradients: for the
  many small entries GAF is SGD at about **twice the learning rate**, and only large entries
  are compressed.  Two controls separate the two effects: ``unit_slope=True`` divides the
  activation by ``αβ`` (slope 1 at 0: the same learning rate as plain SGD, only the
  compression remains), and plain SGD at ``αβ`` times the learning rate (the
  learning-rate-matched baseline: ``--config.optim.lr`` scaled by ``gaf_lr_factor``).

  >>> tx = optax.chain(gaf(0.1, 20.0, unit_slope=True), optax.sgd(0.1, momentum=0.9))
  """
  check_finite_params("gaf", alpha=alpha, beta=beta)
  if alpha <= 0 or beta <= 0:
    raise ValueError(f"gaf needs alpha > 0 and beta > 0, got {alpha}, {beta}")
  tx = _activation_transform(alpha, beta, form)
  return optax.chain(tx, optax.scale(1.0 / gaf_lr_factor(alpha, beta))) if unit_slope else tx


def gaf_lr_factor(alpha: float = 0.1, beta: float = 20.0) -> float:
  """GAF's slope at 0, ``αβ``: the factor by which it scales the learning rate of small
  gradient entries (2 at the published defaults)."""
  return float(alpha * beta)
