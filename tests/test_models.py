"""Staged models: shapes from every point, complete point lists, cut consistency, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpa_jax.models import MODELS, get_model, stage_level
from lpa_jax.models.staged import depth_below_logits
from lpa_jax.perturb.hooks import cut_staged, full_apply

SMALL = {"resnet20": {}, "wrn16_8": {"widen": 1}, "cnn": {"widths": (8, 16)},
         "mlp": {"widths": (16, 8)}}
# Big models are checked abstractly (jax.eval_shape): same code path, no FLOPs.
BIG = ["resnet32", "resnet56", "resnet110", "wrn28_10", "preact_resnet18"]
# The deepest ones compile for long on 2 CPU cores: they run with -m slow.
BIG_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet56", "resnet110") else n
              for n in BIG]
RESNETS = ["resnet20", "wrn16_8"]  # the small models with block points


def _init(model, x):
  return model.init(jax.random.key(0), x, train=False)


def _setup(name, num_classes=7):
  model = get_model(name, num_classes, **SMALL[name])
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  return model, x, _init(model, x)


def test_registry_is_covered():
  assert set(MODELS) == set(SMALL) | set(BIG)


# resnet20 (~17 s) with -m slow: the cnn and the other small models share the staged code.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet20"
                                  else n for n in SMALL])
def test_every_point_roundtrips_to_the_same_logits(name):
  model, x, variables = _setup(name)
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


def _params_above(params, point):
  """``params`` without every layer at or below ``point`` (a stage, or a block in one)."""
  stage, _, block = point.partition(".block")
  order = list(params)  # Flax keeps creation order: stem, stage1, ..., features, logits
  keep = {k: v for k, v in params.items() if order.index(k) > order.index(stage + "_layer")}
  if block:
    inside = {b: v for b, v in params[stage + "_layer"].items() if int(b[5:]) > int(block)}
    keep[stage + "_layer"] = inside
  return keep


@pytest.mark.parametrize("name", RESNETS)
def test_running_from_a_block_point_builds_nothing_below_it(name):
  model, x, variables = _setup(name)
  inner = [p for p in model.points if ".block" in p]
  assert len(inner) == 3 * model.num_blocks
  for point in inner + ["stage2"]:
    act = model.apply(variables, x, stop=point)
    pruned = {"params": _params_above(variables["params"], point),
              "batch_stats": _params_above(variables["batch_stats"], point)}
    # Any layer below the point would need a parameter that is no longer there.
    out = model.apply(pruned, act, start=point)
    np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_flax_perturbations_reach_block_points_and_stage_aliases():
  model, x, variables = _setup("resnet20")
  template = model.apply(variables, x, mutable=["perturbations"])[1]["perturbations"]
  assert tuple(template) == model.points
  delta = jax.random.normal(jax.random.key(2), template["stage3.block1"].shape)
  act = model.apply(variables, x, stop="stage3.block1")
  want = model.apply(variables, act + delta, start="stage3.block1")
  got = model.apply({**variables, "perturbations": {"stage3.block1": delta}}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The stage name is the last block's output, with a perturbation slot of its own above it.
  last = model.apply(variables, x, stop="stage3.block2")
  np.testing.assert_array_equal(last, model.apply(variables, x, stop="stage3"))
  both = {"stage3.block2": last * 0 + 1.0, "stage3": last * 0 + 2.0}
  np.testing.assert_allclose(model.apply({**variables, "perturbations": both}, x),
                             model.apply(variables, last + 3.0, start="stage3"), rtol=1e-5)


@pytest.mark.parametrize("name", BIG_PARAMS)
def test_big_models_have_logits_from_every_kind_of_point(name):
  model = get_model(name, 100)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: _init(model, jnp.zeros(x.shape)))
  blocks = [p for p in model.points if ".block" in p]
  # Every stage-level point, the first (downsampling) block of each stage, the very last block.
  points = list(stage_level(model.points)) + [p for p in blocks if p.endswith(".block0")]
  points += [blocks[-1]]
  for point in points:
    cut = cut_staged(model, point)
    act = jax.eval_shape(lambda v, x: cut.lower(v, x, False)[0], variables, x)
    logits = jax.eval_shape(lambda v, a: cut.upper(v, a, False)[0], variables, act)
    assert logits.shape == (2, 100), point


def test_points_run_bottom_to_top_with_falling_depth():
  model = get_model("resnet32", 10)  # five blocks per stage
  assert stage_level(model.points) == ("stem", "stage1", "stage2", "stage3", "features",
                                       "logits")
  assert model.points[10:14] == ("stage2.block3", "stage2.block4", "stage2", "stage3.block0")
  # Stage-level depths are what they were before blocks had names (configs keep their radii).
  depth = functools.partial(depth_below_logits, model.points)
  assert [depth(p) for p in stage_level(model.points)] == [5, 4, 3, 2, 1, 0]
  assert depth("stage3.block0") == pytest.approx(2.8)
  assert depth("stage3.block3") == pytest.approx(2.2)
  assert depth("stage3.block4") == 2
  depths = [depth_below_logits(model.points, p) for p in model.points]
  assert all(a >= b for a, b in zip(depths, depths[1:]))
  assert get_model("preact_resnet18", 10).points[-5:] == (
      "stage4.block0", "stage4.block1", "stage4", "features", "logits")
  assert len(get_model("resnet110", 10).points) == 3 * (18 + 1) + 3


def test_unknown_point_lists_valid_ones():
  model = get_model("cnn", 10, widths=(8, 16))
  with pytest.raises(ValueError, match="stage1, stage2, features, logits"):
    cut_staged(model, "stage9")
  with pytest.raises(ValueError, match="stage3.block1, stage3.block2, stage3, features"):
    cut_staged(get_model("resnet20", 10), "stage3.block3")
  with pytest.raises(ValueError, match="stage2.block0"):
    get_model("resnet20", 10).apply({}, jnp.zeros((1, 8, 8, 32)), start="stage2.block")


def test_unknown_model_and_head_list_registered():
  with pytest.raises(ValueError, match="resnet32"):
    get_model("resnet33", 10)
  with pytest.raises(ValueError, match="linear, cosine"):
    get_model("mlp", 3, head="cos").init(jax.random.key(0), jnp.ones((1, 4)))


def test_flax_perturbations_collection_adds_at_a_point():
  model = get_model("mlp", 3, widths=(5,))
  x = jnp.ones((2, 4))
  variables = _init(model, x)
  assert set(variables) == {"params"}  # init leaves no batch-shaped perturbation zeros behind
  delta = jnp.arange(10.0).reshape(2, 5)
  act = model.apply(variables, x, stop="hidden1")
  out = model.apply({**variables, "perturbations": {"hidden1": delta}}, x)
  np.testing.assert_allclose(out, model.apply(variables, act + delta, start="hidden1"), rtol=1e-6)
