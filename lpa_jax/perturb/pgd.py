"""Projected gradient descent on class-level perturbation tables.

A table ``δ`` has one row per class, shaped like one sample's activation.  The gradient of the
*summed* per-example loss with respect to ``δ_c`` (added to every class-``c`` sample through
``δ[y]``) is ``Σ_{i∈S_c} ∂ℓ_i/∂a_i``; dividing by ``N_c`` gives the class-averaged activation
gradient of the SPEC.  Only the layers above the point are differentiated.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lpa_jax.perturb.tables import row_norms, rowwise

EPS = 1e-12


def project_rows(table_CxD: jax.Array, radius_C: jax.Array) -> jax.Array:
  """Per-class ℓ2-ball projection: optax's projection vmapped over the class axis.

  optax divides by the norm, which is 0/0 for a zero row at radius 0: those rows stay 0.
  It also squares the radius, which underflows to 0 below ``√tiny`` (``1.1e-19`` in float32),
  where the same 0/0 gave NaN: rows with such a radius are 0 too, a δ that small being below
  float32's resolution of any activation it is added to.  A NaN radius stays NaN (it is
  reported, never silently turned into δ = 0).

  >>> project_rows(jnp.ones((2, 2)), jnp.array([1e-20, 1.0]))
  Array([[0.        , 0.        ],
         [0.70710677, 0.70710677]], dtype=float32)
  """
  r_min = jnp.sqrt(jnp.finfo(table_CxD.dtype).tiny)
  safe_C = jnp.where(radius_C >= r_min, radius_C, 1.0)
  projected = jax.vmap(optax.projections.projection_l2_ball)(table_CxD, safe_C)
  keep = rowwise((radius_C >= r_min) | jnp.isnan(radius_C), table_CxD)
  return jnp.where(keep, projected, 0.0) + rowwise(radius_C * 0.0, table_CxD)


def lowrank_rows(g_CxHxWxD: jax.Array, frac: float = 0.25) -> jax.Array:
  """Keeps each class gradient's top-k singular directions (``k = frac·min(HW, D)``).

  A conv activation's gradient is viewed as an ``HW x D`` matrix ``M``; vectors are returned
  as-is.  The projection is exact: ``U_k U_kᵀ M`` (or ``M V_k V_kᵀ``) with the top-k
  eigenvectors of the Gram matrix on the smaller side, ``min(HW, D)`` squared — far cheaper
  than a batched SVD of ``M``, which cost 2.8x a plain step on an H200.  Directions of zero
  singular value contribute nothing, so rank-deficient or zero rows come back unchanged.

  >>> lowrank_rows(jnp.ones((10, 8, 8, 64)), 0.25).shape   # rank <= 16 per class
  (10, 8, 8, 64)
  """
  if g_CxHxWxD.ndim < 4:
    return g_CxHxWxD
  c, h, w, d = g_CxHxWxD.shape
  k = max(1, int(frac * min(h * w, d)))
  m_CxAxB = g_CxHxWxD.reshape(c, h * w, d)
  if h * w > d:  # put the smaller side first: M V_k V_kᵀ is the same projection as U_k U_kᵀ M
    m_CxAxB = jnp.swapaxes(m_CxAxB, 1, 2)
  hi = jax.lax.Precision.HIGHEST  # a TF32 Gram on GPU would blur nearby singular values
  gram_CxAxA = jnp.einsum("cab,cxb->cax", m_CxAxB, m_CxAxB, precision=hi)
  _, vecs_CxAxA = jnp.linalg.eigh(gram_CxAxA)  # ascending eigenvalues: the top k come last
  top_CxAxK = vecs_CxAxA[..., -k:]
  coef_CxKxB = jnp.einsum("cak,cab->ckb", top_CxAxK, m_CxAxB, precision=hi)
  low_CxAxB = jnp.einsum("cak,ckb->cab", top_CxAxK, coef_CxKxB, precision=hi)
  if h * w > d:
    low_CxAxB = jnp.swapaxes(low_CxAxB, 1, 2)
  return low_CxAxB.reshape(g_CxHxWxD.shape)


def class_pgd(loss_fn: Callable, tables0: dict, count_C: jax.Array, sign_C: jax.Array,
              radius: dict, steps: int, normalize: bool = True, lowrank: float | None = None,
              unroll: bool = True, grad_norm: bool = False):
  """Runs ``steps`` PGD steps on a dict of class tables; returns ``(tables, aux_at_zero)``.

  With ``grad_norm=True`` it returns ``(tables, aux_at_zero, {point: ‖g_c‖_C})`` as well: the
  norm of each class-averaged gradient at ``δ = 0`` (before any low-rank projection), the
  clean network's sensitivity along class ``c``'s shift (0 for absent classes).

  Args:
    loss_fn: ``tables -> (summed loss, aux)``; ``aux`` of the first (δ = 0) call is returned,
      so a caller gets the clean forward's outputs for free.
    tables0: ``{point: δ_CxD...}`` starting values (zeros).
    count_C: samples per class in the (global) batch; absent classes keep δ_c = 0.
    sign_C: +1 ascends the loss (expansive), -1 descends it (contractive), 0 leaves δ_c = 0.
    radius: ``{point: ε_C}`` ℓ2 bounds; step size ``κ_c = 2 ε_c / T``.
    normalize: normalised step ``κ g/‖g‖`` (ours) or the paper's raw ``κ g``.
    lowrank: if set, project each class gradient on its top ``lowrank·min(HW,D)`` directions.
    unroll: unroll the (static, short) PGD loop; the result is the same either way.
    grad_norm: also return ``‖g_c‖`` at ``δ = 0`` (see above).

  >>> act_BxD, y_B = jnp.ones((3, 2)), jnp.array([0, 1, 1])
  >>> def loss_fn(tables):                   # summed loss, aux: here ‖a + δ[y]‖² per example
  ...   z_BxD = act_BxD + tables["p"][y_B]
  ...   return jnp.sum(z_BxD ** 2), z_BxD
  >>> n_C, s_C, e_C = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0]), jnp.array([0.1, 0.1])
  >>> pgd = jax.jit(class_pgd, static_argnums=(0, 5))     # loss_fn and the steps are static
  >>> tables, clean = pgd(loss_fn, {"p": jnp.zeros((2, 2))}, n_C, s_C, {"p": e_C}, 3)
  >>> np.asarray(tables["p"]).round(4)       # class 0 ascends the loss, class 1 descends it
  array([[ 0.0707,  0.0707],
         [-0.0707, -0.0707]], dtype=float32)
  """
  present_C = count_C > 0
  inv_n_C = 1.0 / jnp.maximum(count_C, 1.0)
  # XLA:CPU can miscompile a value_and_grad whose differentiated input is a literal zeros
  # array made inside the trace (NaN clean logits and gradients seen at a 16x16 conv cut);
  # the barrier keeps the starting tables opaque to that rewrite.
  tables0 = jax.lax.optimization_barrier(tables0)

  def grads(tables):
    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(tables)
    return aux, g

  def update(tables, g):
    out = {}
    for p, t in tables.items():
      g_p = g[p] * rowwise(inv_n_C, g[p])
      if lowrank:
        g_p = lowrank_rows(g_p, lowrank)
      if normalize:
        g_p = g_p / rowwise(row_norms(g_p) + EPS, g_p)
      kappa_C = 2.0 * radius[p] / steps
      t = project_rows(t + rowwise(sign_C * kappa_C, t) * g_p, radius[p])
      out[p] = jnp.where(rowwise(present_C & (sign_C != 0), t), t, 0.0)
    return out

  aux0, g0 = grads(tables0)
  tables = update(tables0, g0)
  # Unrolled: T is small and static, and XLA:CPU leaves convolutions inside a while-loop body
  # on a path ~10x slower than the same convolutions at top level (the benchmark showed it).
  tables = jax.lax.fori_loop(1, steps, lambda i, t: update(t, grads(t)[1]), tables,
                             unroll=unroll)
  tables = jax.lax.stop_gradient(tables)
  if not grad_norm:
    return tables, aux0
  # The first step's gradient is already there: logging it costs no pass.
  norms = {p: jax.lax.stop_gradient(row_norms(g) * inv_n_C) for p, g in g0.items()}
  return tables, aux0, norms
