"""Row helpers for class tables (``δ_CxD``: one row per class) and per-example batches.

One helper each for the three things every method needs: the ℓ2 norm of each row, a per-row
scalar broadcast against a table, and the class-table lookup ``δ[y]``.

>>> t_CxD = jnp.ones((3, 2, 2))
>>> row_norms(t_CxD)
Array([2., 2., 2.], dtype=float32)
>>> gather_rows(t_CxD * rowwise(jnp.arange(3.0), t_CxD), jnp.array([2, 0]))[:, 0, 0]
Array([2., 0.], dtype=float32)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def row_norms(x_NxD: jax.Array) -> jax.Array:
  """ℓ2 norm of each row (everything after the leading axis), summed in float32 (a bf16
  activation's squares would otherwise be accumulated in bf16)."""
  # The row size spelt out: reshape(0, -1) cannot infer it (an empty batch raised
  # ZeroDivisionError).
  flat = x_NxD.reshape(x_NxD.shape[0], math.prod(x_NxD.shape[1:])).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(flat), -1))


def rowwise(v_N: jax.Array, like_NxD: jax.Array) -> jax.Array:
  """Reshapes a per-row vector so it broadcasts against ``like_NxD`` (``[N, 1, 1, ...]``)."""
  return v_N.reshape(v_N.shape + (1,) * (like_NxD.ndim - 1))


def gather_rows(table_CxD: jax.Array, labels_B: jax.Array) -> jax.Array:
  """``table[y]``: each example's class row, in ``O(B·D)``.

  A gather, not ``one_hot(y) @ table`` (``2·B·C·D`` FLOPs each way, growing with ``C``).  Under
  ``jax.jit`` over a ``('data',)`` mesh with Auto axes the output follows the batch sharding of
  ``labels``, and its transpose (the gradient with respect to the table) is a scatter-add whose
  replicated result XLA sums over the global batch.  A label outside ``[0, C)`` gets a zero
  row and sends no gradient to any row: under ``jit`` its value cannot be checked, and
  clipping it would hand it (and its gradient) another class's row without a word.
  """
  valid_B = (labels_B >= 0) & (labels_B < table_CxD.shape[0])
  rows = jnp.take(table_CxD, labels_B, axis=0, mode="clip")
  return jnp.where(rowwise(valid_B, rows), rows, 0)


def per_class_mean(onehot_BxC: jax.Array, values_B: jax.Array) -> jax.Array:
  """Mean of ``values_B`` over each class's examples (0 for absent classes)."""
  return (values_B @ onehot_BxC) / jnp.maximum(onehot_BxC.sum(0), 1.0)


def class_counts(labels_B: jax.Array, num_classes: int) -> jax.Array:
  """Examples per class in the batch, as float32 ``[C]`` (a scatter-add, ``O(B)``); a label
  outside ``[0, C)`` counts nowhere (``.at[]`` alone would wrap ``-1`` onto class ``C − 1``)."""
  valid_B = (labels_B >= 0) & (labels_B < num_classes)
  return jnp.zeros((num_classes,), jnp.float32).at[labels_B].add(valid_B.astype(jnp.float32),
                                                                 mode="drop")
