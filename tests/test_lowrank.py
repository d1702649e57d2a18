"""Low-rank LPA gradients: the Gram-matrix ``eigh`` projection equals the SVD truncation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpa_jax.perturb.pgd import lowrank_rows


def svd_reference(g_CxHxWxD, frac):
  """The former implementation: a batched SVD, truncated to the top k singular triplets."""
  c, h, w, d = g_CxHxWxD.shape
  k = max(1, int(frac * min(h * w, d)))
  u, s, vt = jnp.linalg.svd(g_CxHxWxD.reshape(c, h * w, d), full_matrices=False)
  low = jnp.einsum("cik,ck,ckj->cij", u[..., :k], s[..., :k], vt[:, :k, :])
  return low.reshape(g_CxHxWxD.shape)


def low_rank_plus_noise(key, shape, rank, noise):
  c, h, w, d = shape
  ka, kb, kn = jax.random.split(key, 3)
  a = jax.random.normal(ka, (c, h * w, rank))
  b = jax.random.normal(kb, (c, rank, d))
  return (a @ b).reshape(shape) + noise * jax.random.normal(kn, shape)


def _assert_close(got, want):
  scale = float(jnp.abs(want).max()) or 1.0
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)


# (C, H, W, D): HW > D (Gram on the D side), HW < D (Gram on the HW side), square.
SHAPES = [(3, 8, 8, 16), (3, 2, 2, 24), (2, 4, 4, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_matches_svd_on_random_gradients(shape, frac):
  g = jax.random.normal(jax.random.key(sum(shape)), shape)
  _assert_close(jax.jit(lowrank_rows, static_argnums=1)(g, frac), svd_reference(g, frac))


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_svd_on_low_rank_plus_noise(shape):
  k = max(1, int(0.25 * min(shape[1] * shape[2], shape[3])))
  g = low_rank_plus_noise(jax.random.key(3), shape, rank=k, noise=1e-2)
  low = jax.jit(lowrank_rows)(g)
  _assert_close(low, svd_reference(g, 0.25))
  # The best rank-k approximation leaves exactly the tail singular values as residual.
  s = np.linalg.svd(np.asarray(g).reshape(shape[0], -1, shape[3]), compute_uv=False)
  resid = np.linalg.norm(np.asarray(g - low).reshape(shape[0], -1), axis=1)
  np.testing.assert_allclose(resid, np.sqrt((s[:, k:] ** 2).sum(1)), rtol=1e-3)


def test_rank_deficient_and_zero_rows_come_back_unchanged():
  shape = (3, 8, 8, 16)  # k = 4
  g = low_rank_plus_noise(jax.random.key(5), shape, rank=2, noise=0.0)
  g = g.at[1].set(0.0)   # an absent class: all-zero gradient
  g = g.at[2].set(jnp.ones(shape[1:]))  # rank one
  low = jax.jit(lowrank_rows)(g)
  _assert_close(low, g)
  _assert_close(low, svd_reference(g, 0.25))
  np.testing.assert_array_equal(low[1], 0.0)


def test_projection_is_rank_k_and_idempotent():
  g = jax.random.normal(jax.random.key(7), (2, 4, 4, 32))
  low = lowrank_rows(g, 0.25)
  ranks = np.linalg.matrix_rank(np.asarray(low).reshape(2, 16, 32), tol=1e-4)
  assert ranks.max() == 4
  _assert_close(lowrank_rows(low, 0.25), low)


def test_vectors_pass_through():
  v = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(lowrank_rows(v), v)
