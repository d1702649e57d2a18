"""Staged models: shapes from every point, complete point lists, cut consistency, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpa_jax.models import MODELS, get_model
from lpa_jax.perturb.hooks import cut_staged, full_apply

SMALL = {"resnet20": {}, "cnn": {"widths": (8, 16)}, "mlp": {"widths": (16, 8)}}
# Big models are checked abstractly (jax.eval_shape): same code path, no FLOPs.
BIG = ["resnet32", "resnet56", "resnet110", "wrn16_8", "wrn28_10", "preact_resnet18"]


def _init(model, x):
  return model.init(jax.random.key(0), x, train=False)


def test_registry_is_covered():
  assert set(MODELS) == set(SMALL) | set(BIG)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_point_roundtrips_to_the_same_logits(name):
  model = get_model(name, 7, **SMALL[name])
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = _init(model, x)
  full, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
  # The sown activations name exactly the advertised points, in order.
  assert tuple(state["intermediates"]) == tuple(model.points)
  for point in model.points:
    cut = cut_staged(model, point)
    logits, st = full_apply(cut, variables, x, True)
    assert logits.shape == (4, 7)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    if "batch_stats" in state:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   st["batch_stats"], state["batch_stats"])
    act = state["intermediates"][point][0]
    assert cut.lower(variables, x, False)[0].shape == act.shape


@pytest.mark.parametrize("name", BIG)
def test_big_models_have_logits_from_every_point(name):
  model = get_model(name, 100)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: _init(model, jnp.zeros(x.shape)))
  for point in model.points:
    cut = cut_staged(model, point)
    act = jax.eval_shape(lambda v, x: cut.lower(v, x, False)[0], variables, x)
    logits = jax.eval_shape(lambda v, a: cut.upper(v, a, False)[0], variables, act)
    assert logits.shape == (2, 100), point


def test_points_follow_depth():
  assert get_model("resnet32", 10).points == (
      "stem", "stage1", "stage2", "stage3", "features", "logits")
  assert cut_staged(get_model("resnet32", 10), "stage3").depth == 2
  assert cut_staged(get_model("resnet32", 10), "logits").depth == 0


def test_unknown_point_lists_valid_ones():
  model = get_model("cnn", 10, widths=(8, 16))
  with pytest.raises(ValueError, match="stage1, stage2, features, logits"):
    cut_staged(model, "stage9")


def test_unknown_model_lists_registered():
  with pytest.raises(ValueError, match="resnet32"):
    get_model("resnet33", 10)


def test_flax_perturbations_collection_adds_at_a_point():
  model = get_model("mlp", 3, widths=(5,))
  x = jnp.ones((2, 4))
  variables = _init(model, x)
  assert set(variables) == {"params"}  # init leaves no batch-shaped perturbation zeros behind
  delta = jnp.arange(10.0).reshape(2, 5)
  act = model.apply(variables, x, stop="hidden1")
  out = model.apply({**variables, "perturbations": {"hidden1": delta}}, x)
  np.testing.assert_allclose(out, model.apply(variables, act + delta, start="hidden1"), rtol=1e-6)
