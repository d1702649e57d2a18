"""lpa_jax: learning to perturb activations, logits and gradients in JAX/Flax.

Every perturbation — LPA, the activation-level baselines, LPL, logit adjustment, LDAM, LPG —
is one kind of object (:class:`Perturbation`, like an optax transform), composed with
:func:`chain` and run inside your own loop with :func:`perturbed_apply` on a network cut at a
named point (:func:`cut_linen`, :func:`cut_nnx`, :func:`cut_staged`).  Gradient methods are
optax transforms (:func:`gaf`, and optax's own SAM, clipping and noise).

Subpackages: ``lpa_jax.models`` (staged networks with named points) and ``lpa_jax.train``
(the jitted, sharded train step and its K-runs form).  The library needs jax, flax, optax and
numpy only; the experiment application (configs, data, the resumable run loop, sweeps,
reports) lives in the repository's ``experiments/``.
"""
#: The library's version (the one place it is written; pyproject.toml reads it).
__version__ = "0.1.0"

from lpa_jax.perturb import (Cut, Out, Perturbation, add_delta, adversarial, chain,  # noqa: E402
                             check_finite, cut_linen, cut_nnx, cut_staged, deep_augmentation,
                             dropout, gaf, identity, input_cut, ldam, logit_adjust, lpa,
                             lpa_adaptive, lpg, lpl, manifold_mixup, nnx_functional, noise,
                             perturbed_apply, place)

__all__ = [
    "Cut", "Out", "Perturbation", "add_delta", "adversarial", "chain", "check_finite",
    "cut_linen", "cut_nnx", "cut_staged", "deep_augmentation", "dropout", "gaf", "identity",
    "input_cut", "ldam", "logit_adjust", "lpa", "lpa_adaptive", "lpg", "lpl", "manifold_mixup",
    "nnx_functional", "noise", "perturbed_apply", "place", "__version__",
]
