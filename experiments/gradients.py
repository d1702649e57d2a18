"""The config's gradient methods that optax already has: SAM, clipping and gradient noise,
built from a config block's values with their checks (the library has no wrappers for them).

>>> tx = optax.chain(clip(1.0), optax.sgd(0.05, momentum=0.9))
"""
from __future__ import annotations

import functools

import optax

from lpa_jax.perturb.base import check_finite_params


def sam_wrapper(rho: float = 0.05):
  """``tx -> SAM(tx)``: one adversarial step ``w + ρ g/‖g‖`` then ``tx`` on the gradient there.

  ``optax.contrib.sam`` in opaque mode with ``sync_period=2`` makes one ``update`` call one
  full SAM update (BatchNorm statistics are only updated by the outer pass); its
  ``adv_optimizer`` is normalise-then-SGD(ρ), whose sign SAM flips into an ascent step.
  """
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  return functools.partial(optax.contrib.sam, adv_optimizer=adv, sync_period=2, opaque_mode=True)


def sam(optimizer: optax.GradientTransformation, rho: float = 0.05
        ) -> optax.GradientTransformationExtraArgs:
  """SAM (Foret et al. 2021) around ``optimizer``: ``update(grads, state, params, grad_fn=)``
  takes one ascent step ``w + ρ g/‖g‖`` and applies ``optimizer`` to the gradient there
  (``grad_fn(params, i) -> grads`` of the loss; lpa_jax's train step passes it).

  >>> params = {"w": jnp.array([1.0, -2.0])}
  >>> grad_fn = lambda p, i: jax.grad(lambda p: jnp.sum(p["w"] ** 2))(p)   # loss ‖w‖²
  >>> tx = sam(optax.sgd(0.1), rho=0.05)
  >>> opt_state = tx.init(params)
  >>> updates, opt_state = tx.update(grad_fn(params, 0), opt_state, params, grad_fn=grad_fn)
  >>> [round(float(u), 4) for u in updates["w"]]   # -0.1 × the gradient at w + ρ g/‖g‖
  [-0.2045, 0.4089]
  """
  check_finite_params("sam", rho=rho)
  if rho <= 0:
    raise ValueError(f"sam.rho must be > 0, got {rho}")
  return sam_wrapper(rho)(optimizer)


def clip(max_norm: float = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping (``optax.clip_by_global_norm``; ``max_norm`` 1.0 is ours).

  >>> tx = optax.chain(clip(1.0), optax.sgd(0.05, momentum=0.9))   # on the raw gradients
  """
  check_finite_params("clip", max_norm=max_norm)
  if max_norm <= 0:
    raise ValueError(f"clip.max_norm must be > 0, got {max_norm}")
  return optax.clip_by_global_norm(max_norm)


def grad_noise(eta: float = 0.01, gamma: float = 0.55,
               seed: int = 0) -> optax.GradientTransformation:
  """Annealed Gaussian gradient noise (Neelakantan et al.; ``optax.add_noise``): variance
  ``η/(1+t)^γ``; ``seed`` seeds the noise (give each run its own).

  >>> tx = optax.chain(grad_noise(0.01, 0.55, seed=7), optax.sgd(0.05))   # a seed per run
  """
  check_finite_params("grad_noise", eta=eta, gamma=gamma)
  return optax.add_noise(eta, gamma, key=seed)
