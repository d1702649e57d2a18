"""The activation-level family (SPEC §1 table): every method adds ``δ`` at a point.

They differ only in who picks ``δ``: dropout and Gaussian noise draw it at random, Manifold
Mixup pairs samples (and mixes their targets), the adversarial feature perturbation ascends
each sample's loss, Deep Augmentation swaps in a dropped-out or PCA-projected activation.  All
are active only when ``train=True`` and report the same per-class diagnostics as LPA.

>>> from lpa_jax.perturb import dropout
>>> act_BxD, labels_B = jnp.ones((8, 8)), jnp.arange(8) % 3
>>> upper = lambda a_BxD: a_BxD @ jnp.ones((8, 3))   # the layers above the point
>>> method = dropout(rate=0.1)
>>> rng = jax.random.key(0)
>>> out = method.apply(method.init(), act_BxD, labels=labels_B, upper=upper, rng=rng)
>>> np.unique(np.asarray(out.x).round(3))   # a ⊙ m/(1−p), m ~ Bernoulli(1−p)
array([0.   , 1.111], dtype=float32)
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from lpa_jax.perturb.base import (Out, Perturbation, check_extra, check_finite_params,
                                  default_loss, keep_state)
from lpa_jax.perturb.hooks import Cut, full_apply
from lpa_jax.perturb.place import apply_at
from lpa_jax.perturb.tables import row_norms, rowwise

NOISE_MODES = ("additive", "multiplicative")
DEEP_AUG_MODES = ("dropout", "pca")
ADVERSARIAL_METHODS = ("fgsm", "pgd")
MIXUP_SELECT = ("auto", "switch", "mask")


def _transform(perturb: Callable, sign: float = 0.0) -> Perturbation:
  """A stateless activation method from ``perturb(act, labels, upper, rng, targets, loss_fn)
  -> (new_act, targets, clean_logits or None)``; the identity when ``train=False``."""
  def apply(state, act, *, labels, upper, rng=None, train=True, loss_fn=None, targets=None,
            **unused):
    check_extra("activation method", unused)
    if targets is None:
      num_classes = jax.eval_shape(upper, jax.lax.stop_gradient(act)).shape[-1]
      targets = jax.nn.one_hot(labels, num_classes)
    if not train:
      return Out(act, state, targets)
    new_act, targets_out, clean = perturb(act, labels, upper, rng, targets,
                                          loss_fn or default_loss)
    return Out(new_act, state, targets_out, None, clean,
               {"sign_C": jnp.full((targets.shape[-1],), sign, jnp.float32)})
  return Perturbation(lambda: (), apply, keep_state, "activation")


def _dropout_delta(rng, a, rate):
  """``δ = a ⊙ (m/(1−p) − 1)``, ``m ~ Bernoulli(1−p)``: zero in expectation."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, a.shape)
  return a * (keep.astype(a.dtype) / (1.0 - rate) - 1.0)


def dropout(rate: float = 0.1) -> Perturbation:
  """Inverted dropout: ``a ← a ⊙ m/(1−p)``, so ``E[a + δ] = a``.

  >>> m = dropout(rate=0.1)
  """
  check_finite_params("dropout", rate=rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout.rate must lie in [0, 1), got {rate}")

  def perturb(act, labels_B, upper, rng, targets, loss_fn):
    return act + _dropout_delta(rng, act, rate), targets, None
  return _transform(perturb)


def noise(sigma: float = 0.1, mode: str = "additive") -> Perturbation:
  """Gaussian noise: ``δ = σ·n`` (additive) or ``δ = σ·n ⊙ a`` (multiplicative).

  >>> m = noise(sigma=0.1, mode="multiplicative")
  """
  check_finite_params("noise", sigma=sigma)
  if mode not in NOISE_MODES:
    raise ValueError(f"noise.mode must be one of {NOISE_MODES}, got {mode!r}")
  if sigma < 0:
    raise ValueError(f"noise.sigma must be >= 0, got {sigma}")

  def perturb(act, labels_B, upper, rng, targets, loss_fn):
    n = sigma * jax.random.normal(rng, act.shape, act.dtype)
    return act + (n * act if mode == "multiplicative" else n), targets, None
  return _transform(perturb)


def mix(alpha: float = 2.0) -> Perturbation:
  """Mixup at one point: ``a ← λ a + (1−λ) a_π``, ``t ← λ t + (1−λ) t_π``, ``λ ~ Beta(α, α)``,
  ``π`` a random permutation of the batch; ``λ`` and ``π`` come from ``rng`` (one key, the
  same draw at every point).  :func:`manifold_mixup` draws the point as well.

  >>> m = mix(alpha=2.0)
  """
  check_finite_params("manifold_mixup", alpha=alpha)
  if alpha <= 0:
    raise ValueError(f"manifold_mixup.alpha must be > 0, got {alpha}")

  def perturb(act, labels_B, upper, rng, targets, loss_fn):
    lam, perm = _mix_draw(rng, alpha, labels_B.shape[0])
    mixed = lam * act + (1.0 - lam) * act[perm]
    return mixed, lam * targets + (1.0 - lam) * targets[perm], None
  return _transform(perturb)


def _mix_draw(rng, alpha, batch_size):
  r_lam, r_perm, _ = jax.random.split(rng, 3)
  return jax.random.beta(r_lam, alpha, alpha), jax.random.permutation(r_perm, batch_size)


def input_cut(top: Cut) -> Cut:
  """A pseudo-cut at the network input (Manifold Mixup's layer 0): ``lower`` is the identity;
  ``top`` is the network cut at its logits.

  >>> from lpa_jax.perturb import cut_linen
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, train=False):
  ...     return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="block1")(x)))
  >>> model = Net()
  >>> top = cut_linen(model, "head", input_shape=(4,))        # the logits' module
  >>> mixup = manifold_mixup([input_cut(top), cut_linen(model, "block1", input_shape=(4,))])
  >>> mixup.level
  'network'
  """
  def upper(variables, x, train, extra=None, **kw):
    return full_apply(top, variables, x, train, **kw)
  return Cut(lambda variables, x, train, **kw: (x, {}), upper, "input")


def manifold_mixup(cuts: Sequence[Cut], alpha: float = 2.0, select: str = "auto",
                   clean_pass: bool = True) -> Perturbation:
  """Manifold Mixup: per step a layer drawn uniformly from ``cuts`` (``input_cut`` for the
  input), mixed there by :func:`mix` (one ``λ`` and ``π`` for the step).

  ``select='switch'``: a ``lax.switch`` over one branch per point (each branch runs the whole
  net, so all return the same structure) — one pass per step.  ``'mask'``: run every branch and
  keep the drawn one — ``len(cuts)`` passes, but XLA:CPU runs convolution *gradients* inside a
  conditional ~7x slower than outside, so on CPU this is the faster choice.  ``'auto'``: mask on
  CPU, switch elsewhere; the choice made is recorded as ``aux['mix_select_switch']``.
  ``aux['mix_point']`` is the index of the drawn point.  ``clean_pass``: one extra
  no-gradient pass for the clean logits (diagnostics, class statistics), shared by all points.

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb import cut_staged
  >>> model = get_model("mlp", 3, widths=(8,))
  >>> top = cut_staged(model, "logits")
  >>> m = manifold_mixup([input_cut(top), cut_staged(model, "hidden1")], alpha=2.0)
  >>> m.level   # run it with perturbed_apply(m, None, m.init(), variables, x, labels, rng)
  'network'
  """
  if not cuts:
    raise ValueError("manifold_mixup.points must name at least one point")
  if select not in MIXUP_SELECT:
    raise ValueError(f"manifold_mixup.select must be one of {MIXUP_SELECT}, got {select!r}")
  if select == "auto":
    select = "mask" if jax.default_backend() == "cpu" else "switch"
  method = mix(alpha)

  def apply(state, x, *, labels, variables, rng=None, train=True, loss_fn=None, targets=None,
            **unused):
    check_extra("manifold_mixup", unused)
    if not train:
      return apply_at(method, cuts[-1], state, variables, x, labels, rng, False,
                      targets=targets)
    index = jax.random.randint(jax.random.split(rng, 3)[2], (), 0, len(cuts))
    # The clean logits do not depend on the branch: one no-gradient pass serves them all.
    clean = (jax.lax.stop_gradient(full_apply(cuts[-1], variables, x, True)[0])
             if clean_pass else None)
    branches = [lambda c=c: apply_at(method, c, state, variables, x, labels, rng, True,
                                     targets=targets, clean_logits=clean, clean_pass=False)
                for c in cuts]
    if select == "switch":
      fwd = jax.lax.switch(index, branches)
    else:
      fwd = jax.tree.map(lambda *xs: jnp.stack(xs)[index], *[b() for b in branches])
    lam, _ = _mix_draw(rng, alpha, labels.shape[0])
    return fwd._replace(aux={**fwd.aux, "mix_point": index.astype(jnp.float32),
                             "mix_lambda": lam,
                             "mix_select_switch": jnp.float32(select == "switch")})
  return Perturbation(method.init, apply, method.refresh, "network")


def _per_sample_project(d, radius):
  scale = jnp.minimum(1.0, radius / (row_norms(d) + 1e-12))
  return d * rowwise(scale, d)


def adversarial(eps: float = 0.1, beta: float = 0.7, depth: float = 0, method: str = "fgsm",
                steps: int = 1) -> Perturbation:
  """Per-sample adversarial feature perturbation: ``δ_i ≈ argmax_{‖δ_i‖≤ε} ℓ(f_up(a_i+δ_i))``.

  FGSM: one normalised ℓ2 step ``ε·g_i/‖g_i‖``; PGD: ``steps`` steps of size ``2ε/steps`` with
  per-sample projection.  Radius ``β^(L−l)·ε`` as LPA's fixed radius (ours; ``depth`` is
  ``L − l``), so the two differ only in class-level vs per-sample ``δ``.  Only the layers above
  the point are re-run, with frozen parameters, on the loss the caller trains with; ``δ`` is
  then a constant.

  >>> m = adversarial(eps=0.1, method="pgd", steps=3)
  """
  check_finite_params("adversarial", eps=eps, beta=beta, depth=depth)
  if method not in ADVERSARIAL_METHODS:
    raise ValueError(f"adversarial.method must be one of {ADVERSARIAL_METHODS}, got {method!r}")
  if steps < 1 or eps < 0:
    raise ValueError(f"adversarial needs steps >= 1 and eps >= 0, got {steps}, {eps}")
  radius = (beta ** depth) * eps
  steps = 1 if method == "fgsm" else steps
  kappa = radius if method == "fgsm" else 2.0 * radius / steps

  def perturb(act, labels_B, upper, rng, targets, loss_fn):
    act_sg = jax.lax.stop_gradient(act)

    def pgd_loss(d):
      logits = upper(act_sg + d)
      return jnp.sum(loss_fn(logits, targets)), logits

    def step(d):
      (_, logits), g = jax.value_and_grad(pgd_loss, has_aux=True)(d)
      g = g / rowwise(row_norms(g) + 1e-12, g)
      return _per_sample_project(d + kappa * g, radius), logits

    d, clean = step(jax.lax.optimization_barrier(jnp.zeros_like(act_sg)))
    d = jax.lax.fori_loop(1, steps, lambda i, d: step(d)[0], d)
    return act + jax.lax.stop_gradient(d), targets, jax.lax.stop_gradient(clean)
  return _transform(perturb, sign=1.0)


def pca_project(a_BxD: jax.Array, k: int) -> jax.Array:
  """Projects a batch of activations onto the batch's top-``k`` principal components."""
  flat = a_BxD.reshape(a_BxD.shape[0], -1)
  mu = flat.mean(0, keepdims=True)
  _, _, vt = jnp.linalg.svd(flat - mu, full_matrices=False)
  v = vt[:k].T
  return (mu + (flat - mu) @ v @ v.T).reshape(a_BxD.shape)


def deep_augmentation(mode: str = "dropout", rate: float = 0.2,
                      pca_frac: float = 0.25) -> Perturbation:
  """Deep Augmentation: dropout or batch-PCA projection of one layer, stop-gradient on the
  transformed branch: ``a ← a + sg(T(a) − a)``.

  The forward sees ``T(a)``; the layers below get the gradient as if ``a`` were untouched
  (straight-through), which is what distinguishes it from plain dropout at the same point.
  PCA keeps the top ``pca_frac·min(B, D)`` components of the (centred) batch activations.

  >>> m = deep_augmentation(mode="pca", pca_frac=0.25)
  """
  check_finite_params("deep_augmentation", rate=rate, pca_frac=pca_frac)
  if mode not in DEEP_AUG_MODES:
    raise ValueError(f"deep_augmentation.mode must be one of {DEEP_AUG_MODES}, got {mode!r}")
  if not 0.0 <= rate < 1.0 or not 0.0 < pca_frac <= 1.0:
    raise ValueError(f"deep_augmentation needs rate in [0, 1) and pca_frac in (0, 1], got "
                     f"{rate}, {pca_frac}")

  def perturb(act, labels_B, upper, rng, targets, loss_fn):
    act_sg = jax.lax.stop_gradient(act)
    if mode == "dropout":
      delta = _dropout_delta(rng, act_sg, rate)
    else:
      b, d = act_sg.shape[0], act_sg[0].size
      delta = pca_project(act_sg, max(1, int(pca_frac * min(b, d)))) - act_sg
    return act + jax.lax.stop_gradient(delta), targets, None
  return _transform(perturb)
