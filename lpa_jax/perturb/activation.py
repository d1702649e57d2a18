"""The activation-level family (SPEC §1 table): every method adds ``δ`` at a point.

They differ only in who picks ``δ``: dropout and Gaussian noise draw it at random, Manifold
Mixup pairs samples (and mixes their targets), the adversarial feature perturbation ascends
each sample's loss, Deep Augmentation swaps in a dropped-out or PCA-projected activation.  All
are active only when ``train=True`` and report the same per-class diagnostics as LPA.

>>> method = dropout(ctx, point="stage3", rate=0.1)
>>> fwd = method.forward(method.init(), variables, batch, rng, True)
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from lpa_jax.perturb.base import (ActivationMethod, Context, Forward, keep_state,
                                  perturbation_diagnostics, sample_norms)
from lpa_jax.perturb.hooks import Cut, full_apply

NOISE_MODES = ("additive", "multiplicative")
DEEP_AUG_MODES = ("dropout", "pca")
ADVERSARIAL_METHODS = ("fgsm", "pgd")
MIXUP_SELECT = ("auto", "switch", "mask")


def _bshape(v_B, like):
  return v_B.reshape(v_B.shape + (1,) * (like.ndim - 1))


def _point_forward(cut: Cut, num_classes: int, perturb: Callable, sign: float = 0.0):
  """The shared forward: cut, let ``perturb`` replace the activation, run the layers above.

  ``perturb(act, act_sg, frozen_vars, batch, rng) -> (new_act, targets_BxC, clean_logits)``;
  ``clean_logits`` may be ``None``, in which case one extra no-gradient pass computes them (the
  class statistics that drive class splits must not see the random perturbation).
  """
  def forward(state, variables, batch, rng, train):
    if not train:
      logits, st = full_apply(cut, variables, batch.x, train)
      return Forward(logits, batch.targets_BxC, st, {})
    act, st = cut.lower(variables, batch.x, train)
    up_vars = {**variables, **st}
    frozen, act_sg = jax.lax.stop_gradient((up_vars, act))
    new_act, targets_BxC, clean = perturb(act, act_sg, frozen, batch, rng)
    if clean is None:
      clean = jax.lax.stop_gradient(cut.upper(frozen, act_sg, train)[0])
    logits, st2 = cut.upper(up_vars, new_act, train)
    onehot_BxC = jax.nn.one_hot(batch.labels_B, num_classes)
    aux = perturbation_diagnostics(new_act - act, act_sg, onehot_BxC, clean, logits, targets_BxC,
                                   sign, batch.targets_BxC)
    return Forward(logits, targets_BxC, {**st, **st2}, aux)
  return forward


def _method(forward) -> ActivationMethod:
  return ActivationMethod(lambda: (), forward, keep_state)


def _dropout_delta(rng, a, rate):
  """``δ = a ⊙ (m/(1−p) − 1)``, ``m ~ Bernoulli(1−p)``: zero in expectation."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, a.shape)
  return a * (keep.astype(a.dtype) / (1.0 - rate) - 1.0)


def dropout(ctx: Context, point: str, rate: float = 0.1) -> ActivationMethod:
  """Inverted dropout at ``point``: ``a ← a ⊙ m/(1−p)``, so ``E[a + δ] = a``.

  >>> m = dropout(ctx, "stage3", rate=0.1)
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout.rate must lie in [0, 1), got {rate}")

  def perturb(act, act_sg, frozen, batch, rng):
    return act + _dropout_delta(rng, act, rate), batch.targets_BxC, None
  return _method(_point_forward(ctx.cut_fn(point), ctx.num_classes, perturb))


def noise(ctx: Context, point: str, sigma: float = 0.1, mode: str = "additive"):
  """Gaussian noise at ``point``: ``δ = σ·n`` (additive) or ``δ = σ·n ⊙ a`` (multiplicative).

  >>> m = noise(ctx, "stage3", sigma=0.1, mode="multiplicative")
  """
  if mode not in NOISE_MODES:
    raise ValueError(f"noise.mode must be one of {NOISE_MODES}, got {mode!r}")
  if sigma < 0:
    raise ValueError(f"noise.sigma must be >= 0, got {sigma}")

  def perturb(act, act_sg, frozen, batch, rng):
    n = sigma * jax.random.normal(rng, act.shape, act.dtype)
    return act + (n * act if mode == "multiplicative" else n), batch.targets_BxC, None
  return _method(_point_forward(ctx.cut_fn(point), ctx.num_classes, perturb))


def input_cut(ctx: Context) -> Cut:
  """A pseudo-cut at the network input (Manifold Mixup's layer 0): ``lower`` is the identity."""
  top = ctx.cut_fn(ctx.points[-1])
  return Cut(lambda variables, x, train: (x, {}),
             lambda variables, x, train, extra=None: full_apply(top, variables, x, train),
             "input", len(ctx.points))


def manifold_mixup(ctx: Context, points: Sequence[str], alpha: float = 2.0,
                   select: str = "auto") -> ActivationMethod:
  """Manifold Mixup: per step a layer drawn uniformly from ``points`` ("input" allowed),
  ``a ← λ a + (1−λ) a_π``, targets ``t ← λ t + (1−λ) t_π``, ``λ ~ Beta(α, α)``.

  ``select='switch'``: a ``lax.switch`` over one branch per point (each branch runs the whole
  net, so all return the same structure) — one pass per step.  ``'mask'``: run every branch and
  keep the drawn one — ``len(points)`` passes, but XLA:CPU runs convolution *gradients* inside a
  conditional ~7x slower than outside, so on CPU this is the faster choice.  ``'auto'``: mask on
  CPU, switch elsewhere.  ``aux['mix_point']`` is the index of the drawn point.

  >>> m = manifold_mixup(ctx, ("input", "stage1", "stage2"), alpha=2.0)
  """
  if not points:
    raise ValueError("manifold_mixup.points must name at least one point")
  if alpha <= 0:
    raise ValueError(f"manifold_mixup.alpha must be > 0, got {alpha}")
  if select not in MIXUP_SELECT:
    raise ValueError(f"manifold_mixup.select must be one of {MIXUP_SELECT}, got {select!r}")
  if select == "auto":
    select = "mask" if jax.default_backend() == "cpu" else "switch"
  cuts = [input_cut(ctx) if p == "input" else ctx.cut_fn(p) for p in points]

  def perturb_with(lam, perm, clean):
    def perturb(act, act_sg, frozen, batch, rng):
      mixed = lam * act + (1.0 - lam) * act[perm]
      return mixed, lam * batch.targets_BxC + (1.0 - lam) * batch.targets_BxC[perm], clean
    return perturb

  def forward(state, variables, batch, rng, train):
    if not train:
      return _point_forward(cuts[-1], ctx.num_classes, None)(state, variables, batch, rng, False)
    r_lam, r_perm, r_layer = jax.random.split(rng, 3)
    lam = jax.random.beta(r_lam, alpha, alpha)
    perm = jax.random.permutation(r_perm, batch.labels_B.shape[0])
    index = jax.random.randint(r_layer, (), 0, len(cuts))
    # The clean logits do not depend on the branch: one no-gradient pass serves them all.
    clean = jax.lax.stop_gradient(full_apply(cuts[-1], variables, batch.x, True)[0])
    branches = [lambda c=c: _point_forward(c, ctx.num_classes, perturb_with(lam, perm, clean))(
        state, variables, batch, rng, True) for c in cuts]
    if select == "switch":
      fwd = jax.lax.switch(index, branches)
    else:
      fwd = jax.tree.map(lambda *xs: jnp.stack(xs)[index], *[b() for b in branches])
    return fwd._replace(aux={**fwd.aux, "mix_point": index.astype(jnp.float32), "mix_lambda": lam})
  return _method(forward)


def _per_sample_project(d, radius):
  scale = jnp.minimum(1.0, radius / (sample_norms(d) + 1e-12))
  return d * _bshape(scale, d)


def adversarial(ctx: Context, point: str, eps: float = 0.1, beta: float = 0.7,
                method: str = "fgsm", steps: int = 1) -> ActivationMethod:
  """Per-sample adversarial feature perturbation: ``δ_i ≈ argmax_{‖δ_i‖≤ε} ℓ(f_up(a_i+δ_i))``.

  FGSM: one normalised ℓ2 step ``ε·g_i/‖g_i‖``; PGD: ``steps`` steps of size ``2ε/steps`` with
  per-sample projection.  Radius ``β^(L−l)·ε`` as LPA's fixed radius (ours), so the two differ
  only in class-level vs per-sample ``δ``.  Only the layers above the point are re-run, with
  frozen parameters; ``δ`` is then a constant.

  >>> m = adversarial(ctx, "stage3", eps=0.1, method="pgd", steps=3)
  """
  if method not in ADVERSARIAL_METHODS:
    raise ValueError(f"adversarial.method must be one of {ADVERSARIAL_METHODS}, got {method!r}")
  if steps < 1 or eps < 0:
    raise ValueError(f"adversarial needs steps >= 1 and eps >= 0, got {steps}, {eps}")
  cut = ctx.cut_fn(point)
  radius = (beta ** cut.depth) * eps
  steps = 1 if method == "fgsm" else steps
  kappa = radius if method == "fgsm" else 2.0 * radius / steps

  def perturb(act, act_sg, frozen, batch, rng):
    def loss_fn(d):
      logits = cut.upper(frozen, act_sg + d, True)[0]
      return optax.softmax_cross_entropy(logits, batch.targets_BxC).sum(), logits

    def step(d):
      (_, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(d)
      g = g / _bshape(sample_norms(g) + 1e-12, g)
      return _per_sample_project(d + kappa * g, radius), logits

    d, clean = step(jnp.zeros_like(act_sg))
    d = jax.lax.fori_loop(1, steps, lambda i, d: step(d)[0], d)
    return act + jax.lax.stop_gradient(d), batch.targets_BxC, clean
  return _method(_point_forward(cut, ctx.num_classes, perturb, sign=1.0))


def pca_project(a_BxD: jax.Array, k: int) -> jax.Array:
  """Projects a batch of activations onto the batch's top-``k`` principal components."""
  flat = a_BxD.reshape(a_BxD.shape[0], -1)
  mu = flat.mean(0, keepdims=True)
  _, _, vt = jnp.linalg.svd(flat - mu, full_matrices=False)
  v = vt[:k].T
  return (mu + (flat - mu) @ v @ v.T).reshape(a_BxD.shape)


def deep_augmentation(ctx: Context, point: str, mode: str = "dropout", rate: float = 0.2,
                      pca_frac: float = 0.25) -> ActivationMethod:
  """Deep Augmentation: dropout or batch-PCA projection of one layer, stop-gradient on the
  transformed branch: ``a ← a + sg(T(a) − a)``.

  The forward sees ``T(a)``; the layers below get the gradient as if ``a`` were untouched
  (straight-through), which is what distinguishes it from plain dropout at the same point.
  PCA keeps the top ``pca_frac·min(B, D)`` components of the (centred) batch activations.

  >>> m = deep_augmentation(ctx, "stage3", mode="pca", pca_frac=0.25)
  """
  if mode not in DEEP_AUG_MODES:
    raise ValueError(f"deep_augmentation.mode must be one of {DEEP_AUG_MODES}, got {mode!r}")
  if not 0.0 <= rate < 1.0 or not 0.0 < pca_frac <= 1.0:
    raise ValueError(f"deep_augmentation needs rate in [0, 1) and pca_frac in (0, 1], got "
                     f"{rate}, {pca_frac}")

  def perturb(act, act_sg, frozen, batch, rng):
    if mode == "dropout":
      delta = _dropout_delta(rng, act_sg, rate)
    else:
      b, d = act_sg.shape[0], act_sg[0].size
      delta = pca_project(act_sg, max(1, int(pca_frac * min(b, d)))) - act_sg
    return act + jax.lax.stop_gradient(delta), batch.targets_BxC, None
  return _method(_point_forward(ctx.cut_fn(point), ctx.num_classes, perturb))
