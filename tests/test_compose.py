"""Composition with models lpa_jax did not write: Linen by module path, NNX by attribute path,
and lpa_jax's own staged models.  Each cut must (a) reproduce the model's forward and BatchNorm
updates, (b) carry LPA, (c) keep the layers below the point out of PGD, (d) train."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lpa_jax.models import get_model
from lpa_jax.perturb.base import identity
from lpa_jax.perturb.foreign import cut_linen, cut_nnx, nnx_functional
from lpa_jax.perturb.hooks import cut_staged, full_apply
from lpa_jax.perturb.lpa import lpa
from lpa_jax.perturb.place import place
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import StepConfig, make_train_step

C, B, HW = 4, 8, 16
X = jax.random.normal(jax.random.PRNGKey(1), (B, HW, HW, 3))
Y = jnp.arange(B) % C
IN_SHAPE = X.shape[1:]  # the per-example input shape foreign cuts need


# ---------------------------------------------------------------- a Linen model "from elsewhere"
class ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.relu(bn()(nn.Conv(self.features, (3, 3), use_bias=False)(x)))
    y = bn()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    return nn.relu(x + y)


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(
        nn.Conv(16, (3, 3), name="stem")(x)))
    x = ResBlock(16, name="block1")(x, train)
    return ResBlock(16, name="block2")(nn.avg_pool(x, (2, 2), (2, 2)), train)


class Top(nn.Module):
  """What lies above the cut; applied alone it is the FLOP reference."""
  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(8, (1, 1), use_bias=False, name="proj")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    return nn.Dense(C, name="head")(x.mean((1, 2)))


class TheirNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return Top(name="top")(Encoder(name="encoder")(x, train), train)


# ------------------------------------------------------------------ an NNX model "from elsewhere"
class NBlock(nnx.Module):
  def __init__(self, c, rngs):
    self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))


class TheirNnxNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.blocks = nnx.List([NBlock(16, rngs), NBlock(16, rngs)])
    self.proj = nnx.Conv(16, 8, (1, 1), use_bias=False, rngs=rngs)
    self.bn_top = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def top(self, x):
    return self.head(nnx.relu(self.bn_top(self.proj(x))).mean((1, 2)))

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = self.blocks[0](x)
    return self.top(self.blocks[1](nnx.avg_pool(x, (2, 2), (2, 2))))


def _linen():
  model = TheirNet()
  return model, dict(model.init(jax.random.PRNGKey(0), X[:1]))


def _nnx():
  model = TheirNnxNet(nnx.Rngs(0))
  apply_fn, variables = nnx_functional(model)
  return model, apply_fn, variables


def _close(a, b, tol=1e-4):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def _flops(f, *args) -> float:
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _pgd_like(apply, steps=3):
  """``steps`` forward+backward passes to the input of ``apply`` — the shape of PGD's cost."""
  def f(variables, a):
    for _ in range(steps):
      a = a + 0.01 * jax.grad(lambda a: apply(variables, a).sum())(a)
    return a
  return f


# -------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("path", ["encoder/block2", "encoder", ("encoder", "block1")])
def test_linen_cut_equals_forward(train, path):
  model, v = _linen()
  cut = cut_linen(model, path, input_shape=IN_SHAPE)
  out = model.apply(v, X, train=train, mutable=["batch_stats"] if train else False)
  want, want_st = out if train else (out, {})
  got, st = jax.jit(lambda v, x: full_apply(cut, v, x, train))(v, X)
  _close(got, want)
  if train:  # every BatchNorm updated, as by the model's own training forward
    assert jax.tree.leaves(want_st) and jax.tree.structure(st) == jax.tree.structure(want_st)
    _close(st, want_st)
  else:  # inference mode updates nothing
    assert st == {}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("path", ["blocks/1", "blocks/0", "proj"])
def test_nnx_cut_equals_forward(train, path):
  model, apply_fn, v = _nnx()
  cut = cut_nnx(model, path, input_shape=IN_SHAPE)
  got, st = jax.jit(lambda v, x: full_apply(cut, v, x, train))(v, X)
  ref = nnx.clone(model)
  ref.train() if train else ref.eval()
  _close(got, ref(X))
  _close(jax.jit(apply_fn, static_argnums=2)(v, X, train)[0], got)
  if train:
    _close(st["batch_stats"], nnx.state(ref, nnx.BatchStat))
  else:  # inference mode updates nothing
    assert st == {}
  # The caller's variables are not mutated by the merge inside the cut.
  _close(v["batch_stats"], nnx.state(model, nnx.BatchStat))


def test_wrong_paths_list_valid_ones():
  model, v = _linen()
  with pytest.raises(ValueError, match="encoder/block2"):
    cut_linen(model, "encoder/block3", input_shape=IN_SHAPE).lower(v, X, False)
  nmodel, _, _ = _nnx()
  with pytest.raises(ValueError, match="blocks/1"):
    cut_nnx(nmodel, "blocks/7", input_shape=IN_SHAPE)


# -------------------------------------------------------------------------------------- (b)
def _lpa_forward(cut, variables, eps=0.5):
  placed = place(lpa(C, split="all_positive", eps=eps, beta=0.7, steps=3, depth=1), cut)
  fwd = jax.jit(lambda v: placed.apply(placed.init(), X, labels=Y, variables=v,
                                       rng=jax.random.PRNGKey(0), train=True,
                                       targets=jax.nn.one_hot(Y, C)))
  return fwd(variables), 0.7 * eps  # depth 1: radius beta * eps


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_lpa_runs_within_radius(kind):
  if kind == "linen":
    model, v = _linen()
    out, radius = _lpa_forward(cut_linen(model, "encoder/block2", input_shape=IN_SHAPE), v)
  else:
    model, _, v = _nnx()
    out, radius = _lpa_forward(cut_nnx(model, "blocks/1", input_shape=IN_SHAPE), v)
  norms = np.asarray(out.aux["delta_norm_C"])
  assert np.all(norms <= radius * (1 + 1e-5)) and np.all(norms > 0.5 * radius)
  assert float(jnp.mean(out.aux["loss_change_C"])) > 0  # all-positive: expansive
  assert jax.tree.structure(out.model_state["batch_stats"]) == \
      jax.tree.structure(v["batch_stats"])


# -------------------------------------------------------------------------------------- (c)
def _check_flops(cut, ref_upper, full, variables, print_name, max_frac=0.2):
  act = jax.eval_shape(lambda: cut.lower(variables, X, True)[0])
  act = jnp.ones(act.shape, act.dtype)
  f_cut = _flops(_pgd_like(lambda v, a: cut.upper(v, a, True)[0]), variables, act)
  f_ref = _flops(_pgd_like(ref_upper), variables, act)
  f_full = _flops(_pgd_like(full), variables, X)
  print(f"{print_name}: upper via cut {f_cut:.3g}, upper alone {f_ref:.3g}, full {f_full:.3g}")
  assert abs(f_cut - f_ref) <= 0.05 * f_ref
  assert f_cut < max_frac * f_full
  # Train-mode lower+upper with BatchNorm state costs one forward: the placeholder's
  # statistics in upper (and upper's layers in lower) are dead code.
  f_split = _flops(lambda v, x: full_apply(cut, v, x, True), variables, X)
  f_plain = _flops(lambda v, x: full(v, x), variables, X)
  assert abs(f_split - f_plain) <= 0.05 * f_plain, (f_split, f_plain)


def test_linen_pgd_skips_lower_layers():
  model, v = _linen()
  top = lambda v, a: Top().apply({"params": v["params"]["top"],
                                  "batch_stats": v["batch_stats"]["top"]}, a, True,
                                 mutable=["batch_stats"])[0]
  full = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
  _check_flops(cut_linen(model, "encoder", input_shape=IN_SHAPE), top, full, v, "linen")


def test_nnx_pgd_skips_lower_layers():
  model, apply_fn, v = _nnx()
  graphdef = nnx.graphdef(model)

  def top(v, a):
    # Rebuilt in this trace (tree.map), or NNX refuses the BatchNorm update under grad.
    m = nnx.merge(graphdef, *jax.tree.map(lambda u: u, (v["params"], v["batch_stats"])))
    m.train()
    return m.top(a)

  _check_flops(cut_nnx(model, "blocks/1", input_shape=IN_SHAPE), top,
               lambda v, x: apply_fn(v, x, True)[0], v, "nnx")


def test_staged_pgd_skips_lower_layers():
  model = get_model("cnn", C, widths=(16, 32, 32))
  v = dict(model.init(jax.random.PRNGKey(0), X[:1]))
  full = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
  # Reference: the same model cut by module path through nn.intercept_methods.
  via_linen = cut_linen(model, "stage2_layer", input_shape=IN_SHAPE)
  _check_flops(cut_staged(model, "stage2"), lambda v, a: via_linen.upper(v, a, True)[0],
               full, v, "staged", max_frac=0.3)


# -------------------------------------------------------------------------------------- (d)
def _one_step(cut, variables):
  act = place(lpa(C, split="all_positive", eps=0.3, depth=1), cut)
  tx = optax.sgd(0.1, momentum=0.9)
  params = variables["params"]
  model_state = {k: s for k, s in variables.items() if k != "params"}
  state = TrainState(jnp.zeros((), jnp.int32), params, model_state, tx.init(params), act.init(),
                     (), jax.random.PRNGKey(3))
  step = jax.jit(make_train_step(act, identity(), tx,
                                 StepConfig(2, C)))
  batch = {"image": jax.random.normal(jax.random.PRNGKey(4), X.shape),
           "label": Y}
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, params)
  assert max(jax.tree.leaves(moved)) > 0
  assert jax.tree.structure(new.model_state) == jax.tree.structure(model_state)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.model_state, model_state)
  assert all(jax.tree.leaves(changed))  # every BatchNorm, below and above the point, updated
  step(new, batch)  # the output state feeds back in


def test_train_step_linen():
  model, v = _linen()
  _one_step(cut_linen(model, "encoder/block2", input_shape=IN_SHAPE), v)


def test_train_step_nnx():
  model, _, v = _nnx()
  _one_step(cut_nnx(model, "blocks/1", input_shape=IN_SHAPE), v)
