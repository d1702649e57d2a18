"""The perturbation family as transforms, in the style of optax: one protocol for every level.

Every method is a :class:`Perturbation` built from hyper-parameters (``init``, ``apply``,
``refresh``); :func:`chain` composes levels in order, and :func:`perturbed_apply` runs one
inside a network you split at a named point (a :class:`Cut`) and returns the training loss:

>>> from lpa_jax.perturb import chain, cut_linen, logit_adjust, lpa, lpl, perturbed_apply
>>> class Net(nn.Module):                             # any Linen model, here a small MLP
...   @nn.compact
...   def __call__(self, x, train=False):
...     x = nn.relu(nn.Dense(8)(x))
...     x = nn.relu(nn.Dense(8, name="block2")(x))
...     return nn.Dense(3)(x)
>>> model, counts = Net(), [500, 50, 5]               # training examples per class
>>> x, y, rng = jnp.ones((8, 4)), jnp.array([0, 0, 0, 0, 1, 1, 2, 2]), jax.random.key(0)
>>> variables = model.init(rng, x)
>>> perturb = chain(lpa(3, split="longtail", class_counts=counts, eps=0.02,
...                     radius_mode="relative"),
...                 logit_adjust(counts), lpl(3, split="longtail", class_counts=counts))
>>> cut = cut_linen(model, "block2", input_shape=(4,))
>>> @jax.jit                                          # e.g. inside your jitted train step
... def forward(variables, pstate, x, y, rng):
...   return perturbed_apply(perturb, cut, pstate, variables, x, y, rng)
>>> out = forward(variables, perturb.init(), x, y, rng)
>>> loss, pstate = out.loss, out.state
>>> loss.shape, out.x.shape                           # the loss, the logits trained on
((), (8, 3))

Gradient methods are optax transforms chained into your optimiser: :func:`gaf` here, and
optax's own ``clip_by_global_norm``, ``add_noise`` and ``contrib.sam``:

>>> tx = optax.chain(gaf(0.1, 20.0), optax.sgd(0.1, momentum=0.9))
"""
from lpa_jax.perturb.activation import (adversarial, deep_augmentation, dropout, input_cut,
                                        manifold_mixup, noise)
from lpa_jax.perturb.adaptive import lpa_adaptive
from lpa_jax.perturb.base import Out, Perturbation, chain, identity
from lpa_jax.perturb.diagnostics import check_finite
from lpa_jax.perturb.foreign import cut_linen, cut_nnx, nnx_functional
from lpa_jax.perturb.gradient import gaf, lpg
from lpa_jax.perturb.hooks import Cut, cut_staged
from lpa_jax.perturb.logit import ldam, logit_adjust, lpl
from lpa_jax.perturb.lpa import add_delta, lpa
from lpa_jax.perturb.place import perturbed_apply, place

__all__ = [
    "Cut", "Out", "Perturbation", "add_delta", "adversarial", "chain", "check_finite",
    "cut_linen", "cut_nnx", "cut_staged", "deep_augmentation", "dropout", "gaf", "identity",
    "input_cut", "ldam", "logit_adjust", "lpa", "lpa_adaptive", "lpg", "lpl", "manifold_mixup",
    "nnx_functional", "noise", "perturbed_apply", "place",
]
