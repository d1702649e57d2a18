"""The perturbation family as transforms, in the style of optax.

Activation methods transform the activation at one point of a network you split into the
layers below and above it (a :class:`Cut`); build them from hyper-parameters, then call their
pure functions inside any training loop:

>>> method = lpa(num_classes=10, split="longtail", class_counts=counts, eps=0.5,
...              radius_mode="relative")
>>> cut = cut_linen(model, "layer3", input_shape=(32, 32, 3))
>>> out = perturbed_apply(method, cut, method.init(), variables, x, y, rng)

Logit methods (:func:`lpl`, :func:`logit_adjust`, :func:`ldam`, LPG's :func:`lpg`)
rewrite the training logits (or their gradient) and compose in order with :func:`chain`:

>>> logit = chain(logit_adjust(counts, tau=1.0),
...               lpl(10, split="longtail", class_counts=counts, alpha=0.15),
...               lpg(10, split="longtail", class_counts=counts, eps=0.1))
>>> out = logit.apply(lstate, z, Batch(x, y, targets), step)   # LogitOut(logits, weights,
>>> lstate = out.state                                          #          state, aux)

Gradient methods are optax transforms chained into your optimiser (:func:`gaf`, :func:`clip`,
:func:`grad_noise`; :func:`sam` wraps one); LPG (:func:`lpg`) edits the logit gradients, so it
is a logit method chained last:

>>> tx = optax.chain(clip(1.0), gaf(0.1, 20.0), optax.sgd(0.1, momentum=0.9))
"""
from lpa_jax.perturb.activation import (adversarial, deep_augmentation, dropout, input_cut,
                                        manifold_mixup, mix, noise)
from lpa_jax.perturb.adaptive import lpa_adaptive
from lpa_jax.perturb.base import (ActivationMethod, Batch, Forward, LogitMethod, LogitOut,
                                  Perturbed, Placed, chain, identity, identity_logits,
                                  pgd_loss_of)
from lpa_jax.perturb.classes import ClassStats, Split, SplitState
from lpa_jax.perturb.diagnostics import check_finite
from lpa_jax.perturb.foreign import cut_linen, cut_nnx, nnx_functional
from lpa_jax.perturb.gradient import clip, gaf, grad_noise, lpg, lpg_logits, sam
from lpa_jax.perturb.hooks import Cut, cut_staged, full_apply
from lpa_jax.perturb.logit import ldam, logit_adjust, lpl
from lpa_jax.perturb.lpa import LPA, LPAState, add_delta, lpa
from lpa_jax.perturb.place import apply_at, perturbed_apply, place

__all__ = [
    "ActivationMethod", "Batch", "ClassStats", "Cut", "Forward", "LPA",
    "LPAState", "LogitMethod", "LogitOut", "Perturbed", "Placed", "Split", "SplitState",
    "add_delta", "adversarial", "apply_at", "chain",
    "check_finite", "clip", "cut_linen", "cut_nnx", "cut_staged", "deep_augmentation", "dropout",
    "full_apply", "gaf", "grad_noise", "identity", "identity_logits", "input_cut", "ldam",
    "logit_adjust", "lpa", "lpa_adaptive", "lpg", "lpg_logits", "lpl", "manifold_mixup", "mix",
    "nnx_functional", "noise", "perturbed_apply", "pgd_loss_of", "place", "sam"
]
