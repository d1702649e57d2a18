"""On-device batching and augmentation: pure, jittable JAX functions.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.zeros((8, 32, 32, 3), jnp.uint8)
  >>> augment_batch(jax.random.key(0), x, "crop_flip").shape
  (8, 32, 32, 3)
  >>> epoch_permutation(jax.random.key(0), 10, 4).shape   # remainder of 2 dropped
  (2, 4)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "crop_flip")
PAD = 4

# Per-channel mean / std of the training images in [0, 1]. The MNIST-built DG datasets are fed
# as x / 255 without standardisation, as DomainBed does.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "rotated_mnist": ((0.0,), (1.0,)),
    "colored_mnist": ((0.0, 0.0), (1.0, 1.0)),
}


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel ``(mean, std)`` of a dataset, for :func:`normalize`.

  >>> dataset_stats("mnist")
  ((0.1307,), (0.3081,))
  """
  if name not in _STATS:
    raise ValueError(f"dataset_stats: unknown dataset {name!r}; known: {sorted(_STATS)}")
  return _STATS[name]


def normalize(x_uint8: jax.Array, mean, std) -> jax.Array:
  """``(x / 255 - mean) / std`` per channel, as float32.

  >>> normalize(jnp.full((1, 2, 2, 1), 255, jnp.uint8), (0.5,), (0.5,))[0, 0, 0, 0]
  Array(1., dtype=float32)
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x_uint8.astype(jnp.float32) / 255.0 - mean) / std


def _crop_flip_one(rng: jax.Array, x_HxWxC: jax.Array) -> jax.Array:
  h, w, c = x_HxWxC.shape
  k_y, k_x, k_f = jax.random.split(rng, 3)
  # Zero padding, as in the standard CIFAR pad-4 random crop (He et al. 2016).
  padded = jnp.pad(x_HxWxC, ((PAD, PAD), (PAD, PAD), (0, 0)))
  dy = jax.random.randint(k_y, (), 0, 2 * PAD + 1)
  dx = jax.random.randint(k_x, (), 0, 2 * PAD + 1)
  crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
  return jnp.where(jax.random.bernoulli(k_f), crop[:, ::-1], crop)


@functools.partial(jax.jit, static_argnames="kind")
def augment_batch(rng: jax.Array, x_BxHxWxC: jax.Array, kind: str) -> jax.Array:
  """Per-example random augmentation of a uint8 batch; ``kind`` in :data:`AUGMENTATIONS`.

  ``crop_flip``: pad 4 with zeros, random crop back to H x W, random horizontal flip.
  Same key, same output.

  >>> x = jnp.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(jnp.uint8)
  >>> bool((augment_batch(jax.random.key(1), x, "none") == x).all())
  True
  """
  if kind == "none":
    return x_BxHxWxC
  if kind == "crop_flip":
    keys = jax.random.split(rng, x_BxHxWxC.shape[0])
    return jax.vmap(_crop_flip_one)(keys, x_BxHxWxC)
  raise ValueError(f"augment_batch: unknown kind {kind!r}; valid: {AUGMENTATIONS}")


def prepare_batch(rng: jax.Array, images_uint8: jax.Array, labels: jax.Array, augment: str,
                  mean, std) -> dict:
  """What the train step consumes: ``{'image': float32, 'label': int}``, augmented with ``rng``
  (``kind=augment``) and normalised per channel.  Jittable; the step never sees uint8.

  >>> b = prepare_batch(jax.random.key(0), jnp.zeros((2, 4, 4, 1), jnp.uint8), jnp.arange(2),
  ...                   "none", (0.5,), (0.5,))
  >>> b["image"].dtype, b["image"].shape
  (dtype('float32'), (2, 4, 4, 1))
  """
  return {"image": normalize(augment_batch(rng, images_uint8, augment), mean, std),
          "label": labels}


@functools.partial(jax.jit, static_argnames=("n", "batch_size"))
def epoch_permutation(rng: jax.Array, n: int, batch_size: int) -> jax.Array:
  """A random permutation of ``range(n)`` as int32 ``[n // batch_size, batch_size]``.

  The last partial batch is dropped so every step has the same (jit-friendly) shape.

  >>> p = epoch_permutation(jax.random.key(0), 7, 3)
  >>> p.shape, p.dtype, len(set(p.ravel().tolist()))
  ((2, 3), dtype('int32'), 6)
  """
  steps = n // batch_size
  perm = jax.random.permutation(rng, n)[: steps * batch_size]
  return perm.reshape(steps, batch_size).astype(jnp.int32)
