"""LDAM-DRW as published: cosine head, s·(cos − m_y e_y), margins and DRW weights by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpa_jax.models import get_model
from lpa_jax.perturb import logit
from lpa_jax.perturb.base import Batch

COUNTS = np.array([100, 16, 1])
# m_c = n_c^(-1/4) rescaled to max 0.5: 100^(-1/4) = 0.31623, 16^(-1/4) = 0.5, 1^(-1/4) = 1.
MARGINS = [0.5 * 0.316228, 0.25, 0.5]
# (1-β)/(1-β^n) with β = 0.9999: 0.0100496, 0.0625469, 1; normalised to sum to C = 3.
DRW = [0.0281082, 0.1749406, 2.7969512]


def _ctx(num_epochs=200, steps_per_epoch=10):
  """LDAM's arguments for a run of ``num_epochs`` epochs of ``steps_per_epoch`` steps."""
  return dict(class_counts=COUNTS, num_epochs=num_epochs, steps_per_epoch=steps_per_epoch)


def _cosine_logits(name="cnn", **kwargs):
  model = get_model(name, 3, head="cosine", **kwargs)
  x = 3.0 * jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x, model.apply(variables, x)


def test_cosine_head_gives_cosines_of_features_and_class_weights():
  model, variables, x, cos = _cosine_logits(widths=(4, 8))
  assert np.abs(np.asarray(cos)).max() <= 1.0 + 1e-6
  h = np.asarray(model.apply(variables, x, stop="features"), np.float64)
  w = np.asarray(variables["params"]["logits_layer"]["kernel"], np.float64)
  want = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(cos, want, rtol=1e-5, atol=1e-6)
  # A cosine ignores the features' scale; a linear head would scale with it.
  np.testing.assert_allclose(model.apply(variables, 5.0 * h, start="features"), cos, atol=1e-6)


def test_cosine_head_on_a_resnet_and_its_gradient_at_zero_features():
  model, variables, x, cos = _cosine_logits("resnet20")
  assert cos.shape == (6, 3) and np.abs(np.asarray(cos)).max() <= 1.0 + 1e-6
  grad = jax.grad(lambda h: model.apply(variables, h, start="features").sum())
  assert np.isfinite(np.asarray(grad(jnp.zeros((2, 64))))).all()


def test_ldam_refuses_a_linear_head():
  with pytest.raises(ValueError, match="head='cosine'"):
    logit.ldam(**_ctx())


def test_margins_and_drw_weights_match_hand_computed_values():
  np.testing.assert_allclose(logit.ldam_margins(COUNTS), MARGINS, rtol=1e-5)
  np.testing.assert_allclose(logit.drw_weights(COUNTS, 0.9999), DRW, rtol=1e-5)


def test_ldam_trains_on_scaled_cosines_minus_the_true_class_margin():
  _, _, _, cos = _cosine_logits(widths=(4, 8))
  labels = jnp.array([0, 1, 2, 2, 1, 0])
  batch = Batch(None, labels, jax.nn.one_hot(labels, 3))
  m = logit.ldam(**_ctx(), normalized_head=True, batch_normalize=False)  # s = 30, 0.5, 0.9999
  r = jax.jit(lambda c, s: m.apply((), c, labels=batch.labels_B, targets=batch.targets_BxC,
                                   step=s))(cos, 0)
  out, w_B, aux = r.x, r.weights_B, r.aux
  want = 30.0 * np.asarray(cos)
  for i, y in enumerate(np.asarray(labels)):
    want[i, y] = 30.0 * (cos[i, y] - MARGINS[y])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w_B, 1.0)
  assert float(aux["drw_on"]) == 0.0
  np.testing.assert_allclose(m.predict((), cos), cos)  # no margin at test time


def test_drw_starts_at_epoch_160_of_200():
  labels = jnp.array([0, 1, 2, 2])
  batch = Batch(None, labels, jax.nn.one_hot(labels, 3))
  cos = jnp.zeros((4, 3))
  m = logit.ldam(**_ctx(200, 10), normalized_head=True, batch_normalize=False)
  @jax.jit
  def apply(s):
    r = m.apply((), cos, labels=batch.labels_B, targets=batch.targets_BxC, step=s)
    return r.weights_B, r.aux
  w_before, aux_before = apply(1599)
  w_after, aux_after = apply(1600)  # epoch 160 of 200, 10 steps per epoch
  np.testing.assert_allclose(w_before, 1.0)
  np.testing.assert_allclose(w_after, [DRW[0], DRW[1], DRW[2], DRW[2]], rtol=1e-5)
  assert float(aux_before["drw_on"]) == 0.0 and float(aux_after["drw_on"]) == 1.0
  # Batch-normalised weights average to one: PyTorch's weighted-mean cross-entropy.
  mb = logit.ldam(**_ctx(200, 10), normalized_head=True)
  w_B = mb.apply((), cos, labels=batch.labels_B, targets=batch.targets_BxC, step=1600).weights_B
  np.testing.assert_allclose(w_B.mean(), 1.0, rtol=1e-6)
