"""Edges found with models written outside the project (issue 32 §5): a label outside [0, C)
under jit, effects in the layers below the point, NNX points inside transforms, a point reached
through another method, a pytree activation, tiny radii, an empty batch and a num_classes that
is not the model's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpa_jax as lj
from lpa_jax.perturb.foreign import cut_linen, cut_nnx, nnx_functional
from lpa_jax.perturb.hooks import full_apply
from lpa_jax.perturb.pgd import project_rows
from lpa_jax.perturb.tables import class_counts, gather_rows

C, B, D = 3, 6, 5
X = jax.random.normal(jax.random.key(1), (B, D))
Y = jnp.arange(B) % C
KEY = jax.random.key(7)


class Mlp(nn.Module):
  """stem -> body -> head; ``body`` is the point."""
  num_classes: int = C

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="stem")(x))
    return nn.Dense(self.num_classes, name="head")(nn.relu(nn.Dense(8, name="body")(h)))


def _lpa(num_classes=C, **kw):
  return lj.lpa(num_classes, **{"split": "all_positive", "eps": 1.0, **kw})


def _net(model=None, path="body", **kw):
  model = model or Mlp()
  v = model.init(jax.random.key(0), X[:1])
  return model, v, cut_linen(model, path, input_shape=(D,), **kw)


# --------------------------------------------------------------- 1. labels outside [0, C)
def test_gather_and_counts_give_an_out_of_range_label_nothing_under_jit():
  table_CxD = jnp.arange(1.0, C + 1)[:, None] * jnp.ones((C, 2))
  labels = jnp.array([C, -1, 0])
  rows = jax.jit(gather_rows)(table_CxD, labels)
  np.testing.assert_array_equal(rows, [[0, 0], [0, 0], [1, 1]])
  np.testing.assert_array_equal(jax.jit(class_counts, static_argnums=1)(labels, C), [1, 0, 0])
  grad = jax.jit(jax.grad(lambda t: gather_rows(t, labels).sum()))(table_CxD)
  np.testing.assert_array_equal(grad, [[1, 1], [0, 0], [0, 0]])  # label 0 alone reaches a row


@pytest.mark.parametrize("bad", [C, -1])
def test_an_out_of_range_label_takes_no_class_delta_under_jit(bad):
  """The extra example gets δ = 0 and leaves every class's δ and statistics as they were."""
  w_DxC = jax.random.normal(jax.random.key(2), (D, C))
  upper = lambda a: jnp.tanh(a) @ w_DxC  # noqa: E731
  act = jax.random.normal(jax.random.key(3), (B, D))
  method = _lpa(radius_mode="relative")
  f = jax.jit(lambda a, y: method.apply(method.init(), a, labels=y, upper=upper))
  ref = f(act, Y)
  # The extra example is class (bad mod C)'s first one again: clipped or wrapped, it would pull
  # a real class's δ and counts.
  extra = int(np.flatnonzero(np.asarray(Y) == bad % C)[0])
  out = f(jnp.concatenate([act, act[extra:extra + 1]]), jnp.append(Y, bad))
  np.testing.assert_array_equal(out.x[-1], act[extra])
  np.testing.assert_allclose(out.x[:-1], ref.x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.aux["radius_C"], ref.aux["radius_C"], rtol=1e-6)
  for got, want in zip(out.state.stats, ref.state.stats):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------ 2. effects in the layers below the point
CALLS = []  # one entry each time a Noisy layer runs


class Noisy(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    jax.debug.callback(lambda _: CALLS.append(1), h)
    return nn.relu(h)


class NoisyStem(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Noisy(name="stem")(x)
    return nn.Dense(C, name="head")(nn.relu(nn.Dense(8, name="body")(h)))


class ConstAbove(nn.Module):
  """A module called before the point whose output (not the input's) is used above it."""
  @nn.compact
  def __call__(self, x):
    bias = Bias(name="bias")()
    h = nn.relu(nn.Dense(8, name="stem")(x))
    return nn.Dense(C, name="head")(nn.relu(nn.Dense(8, name="body")(h)) + bias)


class Bias(nn.Module):
  @nn.compact
  def __call__(self):
    return jnp.tanh(self.param("b", nn.initializers.normal(1.0), (8,)))


class NnxNoisyStem(nnx.Module):
  def __init__(self, rngs):
    self.stem = NnxNoisy(rngs)
    self.body = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.body(self.stem(x))))


class NnxNoisy(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(D, 8, rngs=rngs)

  def __call__(self, x):
    h = self.dense(x)
    jax.debug.callback(lambda _: CALLS.append(1), h)
    return nnx.relu(h)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_a_callback_below_the_point_runs_as_documented(kind):
  """Once per LPA step with a Linen cut (upper skips the layers below the point); T + 2 times
  with cut_nnx, which cannot skip them (lpa_jax.perturb.foreign's docstring says why)."""
  if kind == "linen":
    _, v, cut = _net(NoisyStem())
  else:
    model = NnxNoisyStem(nnx.Rngs(0))
    v, cut = nnx_functional(model)[1], cut_nnx(model, "body", input_shape=(D,))
  for steps in (1, 3):
    method = _lpa(steps=steps)
    step = jax.jit(lambda v: lj.perturbed_apply(method, cut, method.init(), v, X, Y).logits_BxC)
    jax.block_until_ready(step(v))  # the first call compiles; count the second's
    jax.effects_barrier()
    CALLS.clear()
    jax.block_until_ready(step(v))
    jax.effects_barrier()
    assert len(CALLS) == (1 if kind == "linen" else steps + 2)


def test_upper_skips_only_what_feeds_the_point():
  for model in (NoisyStem(), ConstAbove()):
    model, v, cut = _net(model)
    logits = jax.jit(lambda v, x: full_apply(cut, v, x, False)[0])(v, X)
    np.testing.assert_allclose(logits, model.apply(v, X), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- 3. NNX points inside NNX transforms
class NnxRemat(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Linear(D, 8, rngs=rngs)
    self.body = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    h = nnx.remat(lambda m, h: nnx.relu(m.body(h)))(self, h)
    return self.head(h)


class NnxScan(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Linear(D, 8, rngs=rngs)

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def layers(rngs):
      return nnx.Linear(8, 8, rngs=rngs)

    self.layers = layers(rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(h, layer):
      return nnx.relu(layer(h))
    return self.head(run(self.stem(x), self.layers))


@pytest.mark.parametrize("make,path", [(NnxRemat, "body"), (NnxScan, "layers")])
def test_an_nnx_point_inside_a_transform_is_refused_by_name(make, path):
  model = make(nnx.Rngs(0))
  v = nnx_functional(model)[1]
  cut = cut_nnx(model, path, input_shape=(D,))
  with pytest.raises(ValueError, match=rf"'{path}' runs inside an NNX transform.*nnx\.scan"):
    jax.jit(lambda v, x: cut.lower(v, x, False)[0])(v, X)


# -------------------------------------------------- 4. a point reached through another method
class Block(nn.Module):
  def setup(self):
    self.dense = nn.Dense(8)

  def __call__(self, x):
    return self.dense(x)

  def encode(self, x):
    return nn.relu(self.dense(x))


class Encoded(nn.Module):
  def setup(self):
    self.block = Block()
    self.head = nn.Dense(C)

  def __call__(self, x):
    return self.head(self.block.encode(x))


def test_a_point_reached_through_another_method_names_target_method():
  model, v, cut = _net(Encoded(), "block")
  with pytest.raises(ValueError, match=r"'block' is called through encode.*target_method='encode'"):
    cut.lower(v, X, False)
  cut = cut_linen(model, "block", input_shape=(D,), target_method="encode")
  np.testing.assert_allclose(full_apply(cut, v, X, False)[0], model.apply(v, X), rtol=1e-6)


# ------------------------------------------------------------------ 5. a pytree activation
class Pair(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    return h, h > 0


class Paired(nn.Module):
  @nn.compact
  def __call__(self, x):
    h, mask = Pair(name="pair")(nn.relu(nn.Dense(8, name="stem")(x)))
    return nn.Dense(C, name="head")(h * mask)


class NnxPaired(nnx.Module):
  def __init__(self, rngs):
    self.pair = NnxPair(rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    h, mask = self.pair(x)
    return self.head(h * mask)


class NnxPair(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(D, 8, rngs=rngs)

  def __call__(self, x):
    h = self.dense(x)
    return h, h > 0


def test_a_pytree_activation_is_refused_naming_the_point_and_its_structure():
  _, v, cut = _net(Paired(), "pair")
  method = _lpa()
  with pytest.raises(ValueError, match=r"'pair' returns a tuple of 2 arrays.*one array"):
    lj.perturbed_apply(method, cut, method.init(), v, X, Y)
  model = NnxPaired(nnx.Rngs(0))
  cut = cut_nnx(model, "pair", input_shape=(D,))
  with pytest.raises(ValueError, match=r"'pair' returns a tuple of 2 arrays.*one array"):
    cut.lower(nnx_functional(model)[1], X, False)


# ----------------------------------------------------------------------------- 6. tiny radii
@pytest.mark.parametrize("radius", [1e-30, 1e-20])
def test_a_tiny_radius_gives_a_zero_delta_not_nan(radius):
  """optax squares the radius: below √tiny (1.1e-19 in float32) that is 0, and 0/0 was NaN."""
  table_CxD = jax.random.normal(jax.random.key(4), (C, 4), jnp.float32) * radius
  got = jax.jit(project_rows)(table_CxD, jnp.full((C,), radius, jnp.float32))
  np.testing.assert_array_equal(got, 0.0)
  _, v, cut = _net()
  method = _lpa(eps=radius)
  out = jax.jit(lambda v: lj.perturbed_apply(method, cut, method.init(), v, X, Y))(v)
  assert np.all(np.isfinite(out.logits_BxC))
  act = cut.lower(v, X, False)[0]
  delta_fn = method.info["delta"]
  delta = jax.jit(lambda a: delta_fn(method.init(), lambda z: cut.upper(v, z, False)[0], a,
                                     Y))(act)
  np.testing.assert_array_equal(delta, 0.0)


def test_ordinary_radii_project_as_optax_does_to_the_bit():
  table_CxD = jax.random.normal(jax.random.key(5), (C, 16), jnp.float32)
  radius_C = jnp.array([1e-3, 0.7, 10.0], jnp.float32)
  want = jax.jit(jax.vmap(optax.projections.projection_l2_ball))(table_CxD, radius_C)
  np.testing.assert_array_equal(jax.jit(project_rows)(table_CxD, radius_C), want)


# ------------------------------------------------------------------------- 7. an empty batch
@pytest.mark.parametrize("jit", [False, True])
def test_an_empty_batch_passes_through_unchanged(jit):
  model, v, cut = _net()
  method = _lpa()
  x0, y0 = X[:0], Y[:0]
  fwd = lambda v: lj.perturbed_apply(method, cut, method.init(), v, x0, y0)  # noqa: E731
  out = (jax.jit(fwd) if jit else fwd)(v)
  assert out.logits_BxC.shape == (0, C)
  act = cut.lower(v, x0, False)[0]
  got = method.apply(method.init(), act, labels=y0, upper=lambda a: cut.upper(v, a, False)[0])
  assert got.x.shape == act.shape == (0, 8)
  np.testing.assert_array_equal(got.state.stats.count_C, 0)


# ------------------------------------------------------------------- 8. a num_classes mismatch
@pytest.mark.parametrize("built,logits", [(5, 10), (10, 3)])
def test_a_num_classes_mismatch_speaks_of_num_classes_and_logits(built, logits):
  model, v, cut = _net(Mlp(logits))
  y = jnp.arange(B) % min(built, logits)
  method = _lpa(built)
  msg = (rf"lpa was built with num_classes={built}, but the layers above the point return "
         rf"logits of shape \({B}, {logits}\), the model's {logits} classes")
  with pytest.raises(ValueError, match=msg) as e:
    lj.perturbed_apply(method, cut, method.init(), v, X, y)
  assert "targets" not in str(e.value)
  act = cut.lower(v, X, False)[0]
  with pytest.raises(ValueError, match=msg):
    method.apply(method.init(), act, labels=y, upper=lambda a: cut.upper(v, a, False)[0])


def test_targets_the_caller_passed_are_still_named_when_wrong():
  _, v, cut = _net()
  act = cut.lower(v, X, False)[0]
  method = _lpa()
  with pytest.raises(ValueError, match=r"lpa: targets must have shape \(batch, num_classes\) = "
                                       rf"\({B}, {C}\), got \({B}, {C + 1}\)"):
    method.apply(method.init(), act, labels=Y, upper=lambda a: cut.upper(v, a, False)[0],
                 targets=jax.nn.one_hot(Y, C + 1))
