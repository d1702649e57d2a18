"""lpa_jax: learning to perturb activations, logits and gradients in JAX/Flax.

Subpackages, in the order data flows through them:
``data`` (TFDS loading, long tail, noise, domains, on-device batching) →
``models`` (staged networks with named intervention points) →
``perturb`` (LPA and the rest of the perturbation family, one interface) →
``train`` (state, the jitted sharded step, the resumable loop, evaluation).
Importing the package never imports TensorFlow.
"""
__version__ = "0.1.0"

from lpa_jax.perturb import (LPA, LPAState, add_delta, check_finite, cut_linen, cut_nnx,  # noqa: E402
                             cut_staged, lpa, nnx_functional, perturbed_apply)

__all__ = ["LPA", "LPAState", "add_delta", "check_finite", "cut_linen", "cut_nnx", "cut_staged",
           "lpa", "nnx_functional", "perturbed_apply", "__version__"]
