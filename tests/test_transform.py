"""LPA and the activation family as transforms: the public functions, identity at eval, the loss
PGD follows, loud failures, the cost of the class-table gather, and one compile per loop."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

import lpa_jax as lj
from experiments.configs import methods
from experiments.data.pipeline import dataset_stats, normalize
from lpa_jax.perturb import activation, classes
from experiments import registry
from lpa_jax.perturb.base import identity, pgd_loss_of
from experiments.registry import Context
from lpa_jax.perturb.diagnostics import check_finite
from lpa_jax.perturb.hooks import cut_staged
from lpa_jax.models import get_model

C = 10


class ConvNet(nn.Module):
  """A small CNN whose ``block`` output is a 16x16 conv activation (CIFAR-sized input)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3), dtype=self.dtype, name="conv")(x))
    h = nn.relu(nn.Conv(16, (3, 3), strides=2, dtype=self.dtype, name="block")(h))
    h = nn.Conv(16, (3, 3), dtype=self.dtype, name="top")(h)
    return nn.Dense(C, dtype=self.dtype, name="head")(h.mean((1, 2)))


@pytest.fixture(scope="module")
def batch(fmnist_lt):
  x = normalize(fmnist_lt.x_train[:96], *dataset_stats("fashion_mnist"))
  x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))  # 32x32: the cut below is 16x16x16
  return x, jnp.asarray(fmnist_lt.y_train[:96]), fmnist_lt.class_counts()


def _net(batch, dtype=jnp.float32):
  x, _, _ = batch
  model = ConvNet(dtype)
  variables = model.init(jax.random.key(0), x[:1])
  return model, variables, lj.cut_linen(model, "block", input_shape=x.shape[1:])


def test_lpa_at_a_16x16_conv_cut_is_finite_and_perturbs_every_signed_class(batch):
  """The cut where XLA:CPU returned NaN clean logits from a literal zeros start (which a
  guard-free split turned into a silent δ = 0): every present class with a sign moves."""
  x, y, counts = batch
  model, variables, cut = _net(batch)
  method = lj.lpa(C, split="signs", signs=[1, -1] * 5, eps=0.5, radius_mode="relative")
  out = jax.jit(lambda v: lj.perturbed_apply(method, cut, method.init(), v, x, y,
                                             jax.random.key(1)))(variables)
  aux = jax.device_get(out.aux)
  check_finite(aux, method="lpa", point="block")
  assert np.isfinite(np.asarray(out.clean_logits)).all()
  present = aux["present_C"] > 0
  assert present.sum() >= 6
  assert np.all(aux["delta_norm_C"][present] > 0)
  signs = np.array([1, -1] * 5)
  assert np.all(aux["loss_change_C"][present & (signs > 0)] > 0)
  assert np.all(aux["loss_change_C"][present & (signs < 0)] < 0)


def test_delta_then_add_equals_apply_and_radius_bounds_rows(batch):
  x, y, _ = batch
  model, variables, cut = _net(batch)
  act = cut.lower(variables, x, True)[0]
  upper = lambda a: cut.upper(variables, a, True)[0]  # noqa: E731
  method = lj.lpa(C, split="all_positive", eps=0.3, radius_mode="relative")
  state = method.init()
  delta = jax.jit(lambda a: method.info["delta"](state, upper, a, y))(act)
  chex.assert_shape(delta, (C,) + act.shape[1:])
  out = jax.jit(lambda a: method.apply(state, a, labels=y, upper=upper))(act)
  np.testing.assert_allclose(out.x, lj.add_delta(act, delta, y), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.x - act, delta[y], rtol=1e-6, atol=1e-6)
  radius = method.info["radii"](state, act, y)
  norms = np.asarray(jnp.sqrt(jnp.sum(delta.reshape(C, -1) ** 2, -1)))
  assert np.all(norms <= np.asarray(radius) * (1 + 1e-5))


@pytest.mark.parametrize("name", ["lpa", "dropout", "noise", "mix", "adversarial",
                                  "deep_augmentation", "identity"])
def test_train_false_is_the_identity_for_every_activation_method(batch, name):
  x, y, counts = batch
  model, variables, cut = _net(batch)
  method = {"lpa": lambda: lj.lpa(C, split="all_positive", eps=1.0),
            "dropout": lambda: activation.dropout(0.5), "noise": lambda: activation.noise(1.0),
            "mix": lambda: activation.mix(1.0), "adversarial": lambda: activation.adversarial(1.0),
            "deep_augmentation": lambda: activation.deep_augmentation("pca"),
            "identity": identity}[name]()
  act = cut.lower(variables, x, False)[0]
  upper = lambda a: cut.upper(variables, a, False)[0]  # noqa: E731
  out = method.apply(method.init(), act, labels=y, upper=upper, rng=jax.random.key(0),
                     train=False)
  assert out.x is act
  trained = method.apply(method.init(), act, labels=y, upper=upper, rng=jax.random.key(0),
                         train=True)
  if name != "identity":  # and in training mode each of them does perturb
    assert float(jnp.abs(trained.x - act).max()) > 0, name


def test_pgd_follows_the_loss_the_caller_trains_with():
  """At the logits (upper = identity) the class gradient of ℓ(z + δ + b) is closed-form:
  PGD with a logit-adjusted loss must match a hand-written PGD on that loss, and differ
  from PGD on plain cross-entropy."""
  rs = np.random.RandomState(0)
  z = jnp.asarray(rs.randn(40, 4).astype(np.float32))
  y = jnp.asarray(np.arange(40) % 4)
  shift = jnp.asarray(np.log([0.6, 0.25, 0.1, 0.05]).astype(np.float32))
  signs, eps, steps = np.array([1, -1, 1, -1]), 0.8, 3
  method = lj.lpa(4, split="signs", signs=tuple(signs), eps=eps, steps=steps, beta=1.0)
  la = lambda logits, t: optax.softmax_cross_entropy(logits + shift, t)  # noqa: E731
  got = method.info["delta"](method.init(), lambda a: a, z, y, loss_fn=la)
  plain = method.info["delta"](method.init(), lambda a: a, z, y)
  zn, yn, delta = np.asarray(z, np.float64), np.asarray(y), np.zeros((4, 4))
  for _ in range(steps):
    logits = zn + delta[yn] + np.asarray(shift)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for c in range(4):
      g = (p[yn == c] - np.eye(4)[c]).mean(0)
      delta[c] += signs[c] * (2 * eps / steps) * g / np.linalg.norm(g)
      delta[c] *= min(1.0, eps / np.linalg.norm(delta[c]))
  np.testing.assert_allclose(got, delta, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(got - plain).max()) > 1e-3


def test_pgd_loss_of_a_composed_logit_method_carries_its_weights():
  """The train step's PGD loss is the logit method's loss times its per-example weights."""
  ctx = Context(4, np.array([40, 20, 10, 5]), 10, 5, None, ())
  pc = mlc.ConfigDict(dict(activation="none", gradient="none", logit="logit_adjust,lpl",
                           **methods.method_blocks("longtail")))
  logit = registry.make_logit(pc, ctx)
  z = jnp.asarray(np.random.RandomState(1).randn(8, 4).astype(np.float32))
  y = jnp.arange(8) % 4
  t = jax.nn.one_hot(y, 4)
  loss_fn = pgd_loss_of(logit, logit.init(), y, t, 0)
  out = logit.apply(logit.init(), z, labels=y, targets=t, step=0)
  zz, w = out.x, out.weights_B
  np.testing.assert_allclose(loss_fn(z, t), w * optax.softmax_cross_entropy(zz, t), rtol=1e-6)


@pytest.mark.parametrize("field,value", [("eps", math.nan), ("beta", math.inf),
                                         ("delta_eps", -math.inf)])
def test_nonfinite_hyperparameters_are_rejected_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"lpa.{field} must be finite"):
    lj.lpa(C, **{field: value})
  ctx = Context(C, np.full(C, 10), 1, 1, None, ())
  pc = mlc.ConfigDict(dict(activation="lpa", logit="none", gradient="none",
                           **methods.method_blocks("balanced")))
  pc.lpa[field] = value
  with pytest.raises(ValueError, match=f"lpa.{field} must be finite"):
    registry.make_activation(pc, ctx)


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=-1), r"lpa.depth .* must be >= 0, got -1"),
    (dict(lowrank=0.0), r"lpa.lowrank .* must lie in \(0, 1\], got 0.0; None turns"),
    (dict(lowrank=2), r"lpa.lowrank .* must lie in \(0, 1\], got 2"),
    (dict(steps=1.5), r"lpa.steps \(PGD steps T\) must be an integer >= 1, got 1.5"),
    (dict(steps=0), r"lpa.steps .* got 0"),
    (dict(split="longtail", class_counts=[5, -1] + [1] * (C - 2)), r"finite counts >= 0"),
])
def test_lpa_that_would_do_nothing_or_something_else_is_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lj.lpa(C, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=0, varied=False), r"eps=0 and varied=False has radius 0.*perturbs nothing"),
    (dict(eps=0, delta_eps=0), r"eps=0 and delta_eps=0 has radius 0"),
    (dict(split="signs", signs=(0,) * C), r"split signs are all 0.*no class is perturbed"),
])
def test_lpa_that_perturbs_nothing_warns(kwargs, message):
  """Built by hand it warns (the plain forward is a check of its own); a config run selecting
  it is refused (test_registry)."""
  with pytest.warns(UserWarning, match=message):
    lj.lpa(C, **kwargs)


def test_lpa_settings_at_the_edge_of_valid_are_accepted():
  lj.lpa(C, eps=0, delta_eps=0.1)  # varied: the radius is Δε·|τ − q_c|
  lj.lpa(C, lowrank=1.0, depth=0, steps=np.int64(1))
  lj.lpa(C, split="longtail", class_counts=[0] + [5] * (C - 1))  # an absent class
  with pytest.raises(ValueError, match="lpa.num_classes must be a positive int, got 0"):
    lj.lpa(0)


@pytest.mark.parametrize("name,field", [("dropout", "rate"), ("noise", "sigma"),
                                        ("lpl", "alpha"), ("logit_adjust", "tau"),
                                        ("ldam", "max_margin"), ("gaf", "beta"),
                                        ("sam", "rho"), ("clip", "max_norm")])
def test_every_method_block_rejects_nan(name, field):
  ctx = Context(C, np.full(C, 10), 1, 1, None, ())
  pc = mlc.ConfigDict(dict(activation="none", logit="none", gradient="none",
                           **methods.method_blocks("balanced")))
  level = ("activation" if name in registry.ACTIVATION else
           "logit" if name in registry.LOGIT else "gradient")
  pc[level] = name
  pc[name][field] = math.nan
  make = {"activation": registry.make_activation, "logit": registry.make_logit,
          "gradient": registry.make_gradient}[level]
  with pytest.raises(ValueError, match=f"{name}.{field} must be finite"):
    make(pc, ctx)


def test_a_nan_class_statistic_stops_with_method_point_and_class(batch):
  """A NaN statistic used to become a NaN radius and then a silently zero δ."""
  x, y, _ = batch
  model, variables, cut = _net(batch)
  method = lj.lpa(C, split="balanced", eps=0.5)
  stats = classes.ClassStats.zeros(C)._replace(
      count_C=jnp.full((C,), 5.0), prob_sum_C=jnp.full((C,), 2.0).at[3].set(jnp.nan))
  state = method.refresh(method.init(), stats)
  out = jax.jit(lambda v: lj.perturbed_apply(method, cut, state, v, x, y,
                                             jax.random.key(1)))(variables)
  aux = jax.device_get(out.aux)
  with pytest.raises(FloatingPointError,
                     match=r"lpa at point 'block': non-finite class_stat_C at class\(es\) \[3\];"
                           r".* radius_C at class.* at step 7"):
    check_finite(aux, step=7, method="lpa", point="block")
  check_finite({"radius_C": np.ones(C), "present_C": np.ones(C)})  # finite: no error


def _pgd_flops(num_classes: int) -> float:
  model = get_model("cnn", num_classes, widths=(4, 8, 8))
  x = jnp.zeros((32, 16, 16, 3))
  y = jnp.arange(32) % num_classes
  variables = model.init(jax.random.key(0), x[:1])
  cut = cut_staged(model, "stage1")
  act = cut.lower(variables, x, True)[0]
  method = lj.lpa(num_classes, split="all_positive", eps=1.0, steps=3)
  f = jax.jit(lambda a: method.info["delta"](
      method.init(), lambda b: cut.upper(variables, b, True)[0], a, y))
  return float(f.lower(act).compile().cost_analysis()["flops"]), act[0].size


def test_the_class_table_gather_does_not_grow_with_the_number_of_classes():
  """``one_hot(y) @ δ`` would add ``4·B·C·D`` FLOPs per PGD step (forward and transpose);
  the gather adds ``O(B·D)``.  Only O(C·D) table arithmetic may grow with C."""
  small, d = _pgd_flops(10)
  large, _ = _pgd_flops(1000)
  one_hot_cost = 4 * 32 * (1000 - 10) * d * 3
  assert large - small < 0.25 * one_hot_cost, (small, large, one_hot_cost)


def test_bf16_network_stays_bf16_above_the_point(batch):
  x, y, _ = batch
  model, variables, cut = _net(batch, jnp.bfloat16)
  method = lj.lpa(C, split="all_positive", eps=0.5, radius_mode="relative")
  upper_dtypes = []

  def upper_spy(v, a, train, extra=None, **kw):
    upper_dtypes.append(a.dtype)
    return cut.upper(v, a, train, extra, **kw)

  spied = cut._replace(upper=upper_spy)
  out = jax.jit(lambda v: lj.perturbed_apply(method, spied, method.init(), v, x, y))(variables)
  assert out.logits_BxC.dtype == jnp.bfloat16
  assert set(upper_dtypes) == {jnp.dtype(jnp.bfloat16)}
  assert float(out.aux["delta_norm_C"].max()) > 0


def test_a_users_jitted_step_compiles_once_across_steps_and_refreshes(batch):
  x, y, counts = batch
  model, variables, cut = _net(batch)
  method = lj.lpa(C, split="balanced", eps=0.5, radius_mode="relative")
  tx = optax.sgd(0.05)
  params = variables["params"]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, opt, pstate, xb, yb, rng):
    def loss_fn(p):
      out = lj.perturbed_apply(method, cut, pstate, {"params": p}, xb, yb, rng)
      return optax.softmax_cross_entropy_with_integer_labels(out.logits_BxC, yb).mean(), out
    (loss, out), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, out.state, loss

  opt, pstate = tx.init(params), method.init()
  for _epoch in range(2):
    for i in range(3):
      sl = slice(32 * i, 32 * (i + 1))
      params, opt, pstate, loss = step(params, opt, pstate, x[sl], y[sl], jax.random.key(i))
    assert float(pstate.stats.count_C.sum()) == 96
    pstate = method.refresh(pstate)
    # The balanced split now has signs for the classes seen, from the clean statistics.
    assert int(jnp.sum(pstate.sign_C != 0)) >= 6 and float(pstate.stats.count_C.sum()) == 0
  assert np.isfinite(float(loss))


class _ThreeDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="a")(x))
    h = nn.relu(nn.Dense(8, name="b")(h))
    return nn.Dense(4, name="out")(h)

def test_placed_methods_take_the_same_call():
  """Manifold Mixup and adaptive LPA, built placed at their points, go through
  perturbed_apply like LPA does (cut=None), and give what their own forward gives."""
  from lpa_jax.perturb import (cut_linen, input_cut, lpa, lpa_adaptive, manifold_mixup,
                               perturbed_apply, place)
  x, y = jax.random.normal(jax.random.key(0), (16, 6)), jnp.arange(16) % 4
  model = _ThreeDense()
  v = model.init(jax.random.key(1), x)
  cut_a, cut_b = (cut_linen(model, p, input_shape=(6,)) for p in ("a", "b"))
  top = cut_linen(model, "out", input_shape=(6,))
  mixup = manifold_mixup([input_cut(top), cut_a], alpha=0.4)
  out = perturbed_apply(mixup, None, mixup.init(), v, x, y, jax.random.key(2))
  assert out.logits_BxC.shape == (16, 4) and out.targets_BxC.shape == (16, 4)
  assert not np.allclose(out.targets_BxC, jax.nn.one_hot(y, 4))        # mixed
  want = mixup.apply(mixup.init(), x, labels=y, variables=v, rng=jax.random.key(2), train=True,
                     targets=jax.nn.one_hot(y, 4))
  np.testing.assert_array_equal(out.logits_BxC, want.logits_BxC)
  ada = lpa_adaptive([(lpa(4, split="all_positive", eps=0.5), cut_a),
                      (lpa(4, split="all_positive", eps=0.5), cut_b)], every=1)
  fwd = perturbed_apply(ada, None, ada.init(), v, x, y, jax.random.key(3))
  assert fwd.logits_BxC.shape == (16, 4) and "layer_index" in fwd.aux
  with pytest.raises(TypeError, match="already placed"):
    perturbed_apply(mixup, cut_a, mixup.init(), v, x, y, jax.random.key(2))
  with pytest.raises(TypeError, match="clean_pass"):   # an option of place(), not of the call
    perturbed_apply(mixup, None, mixup.init(), v, x, y, jax.random.key(2), clean_pass=False)
  with pytest.raises(TypeError, match="needs the Cut of the network"):
    perturbed_apply(lpa(4, split="all_positive", eps=0.5), None, (), v, x, y)
  placed = place(lpa(4, split="all_positive", eps=0.5), cut_b, diagnostics=False)
  fwd = perturbed_apply(placed, None, placed.init(), v, x, y)
  assert fwd.logits_BxC.shape == (16, 4) and "delta_norm_C" not in fwd.aux
  assert "delta_norm_C" in perturbed_apply(lpa(4, split="all_positive", eps=0.5), cut_b,
                                           placed.init(), v, x, y).aux
