"""Cuts of models written outside lpa_jax, in the shapes such models come in: no BatchNorm, no
``train`` argument, ``nn.Dropout`` / ``nnx.Dropout``, bf16 layers.  Each half pair must equal the
model's own forward (values, dtypes, state, random masks) and a cut must hold no state."""
import functools
import inspect
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lpa_jax.models.staged import run_stages
from lpa_jax.perturb.base import identity
from lpa_jax.perturb.foreign import cut_linen, cut_nnx, nnx_functional, reseed_nnx
from lpa_jax.perturb.hooks import cut_staged, full_apply
from lpa_jax.perturb.lpa import lpa
from lpa_jax.perturb.place import place
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import StepConfig, make_train_step

C, B, HW = 3, 6, 8
X = jax.random.normal(jax.random.PRNGKey(1), (B, HW, HW, 3))
KEY, KEY2 = jax.random.PRNGKey(7), jax.random.PRNGKey(8)


# ------------------------------------------------------------------------------ Linen models
class PlainConv(nn.Module):
  """No BatchNorm, no ``train`` argument: nothing to update, nothing to switch."""
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(8, (3, 3), name="body")(x))
    return nn.Dense(C, name="head")(x.mean((1, 2)))


class DropConv(nn.Module):
  """Dropout below and above the cut, optional BatchNorm, a ``train`` argument."""
  bn: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name="stem")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    x = nn.Dropout(0.5, deterministic=not train, name="drop_lo")(nn.relu(x))
    x = nn.relu(nn.Conv(8, (3, 3), name="body")(x))
    x = nn.Dropout(0.5, deterministic=not train, name="drop_hi")(x)
    return nn.Dense(C, name="head")(x.mean((1, 2)))


class DetConv(nn.Module):
  """Flax-example style: ``deterministic`` (the inverse of train) instead of ``train``."""
  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.relu(nn.Conv(8, (3, 3), name="body")(x))
    x = nn.Dropout(0.5, deterministic=deterministic)(x)
    return nn.Dense(C, name="head")(x.mean((1, 2)))


class Bf16Conv(nn.Module):
  """bf16 layers; returns log-probabilities, in the input's dtype when ``cast_out``."""
  cast_out: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(8, (3, 3), dtype=jnp.bfloat16, name="stem")(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=jnp.bfloat16, name="bn")(h))
    h = nn.relu(nn.Conv(8, (3, 3), dtype=jnp.bfloat16, name="body")(h))
    out = nn.log_softmax(nn.Dense(C, dtype=jnp.bfloat16, name="head")(h.mean((1, 2))))
    return out.astype(x.dtype) if self.cast_out else out


def _init(model, x=X):
  return dict(model.init(jax.random.PRNGKey(0), x[:1]))


def _own_forward(model, v, x, mutate, rng=None, **kw):
  """The model's own forward: ``(out, new_state)`` as a training step would compute them."""
  mut = ["batch_stats"] if mutate and "batch_stats" in v else False
  out = model.apply(v, x, mutable=mut, rngs={"dropout": rng} if rng is not None else {}, **kw)
  return out if mut else (out, {})


def _close(a, b, tol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):  # nnx.Rngs stream keys
      u, w = jax.random.key_data(u), jax.random.key_data(w)
    np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol)


def _cut_l(model, path, x=X, **kw):
  return cut_linen(model, path, input_shape=x.shape[1:], input_dtype=x.dtype, **kw)


# ---------------------------------------------------------------- 1, 2: no batch_stats, no train
@pytest.mark.parametrize("model,kw", [(PlainConv(), {}), (DropConv(), {"train": True})])
def test_linen_without_batch_stats_trains(model, kw):
  v = _init(model)
  assert "batch_stats" not in v
  cut = _cut_l(model, "body")
  got, st = jax.jit(lambda v, x: full_apply(cut, v, x, True, rng=KEY))(v, X)
  _close(got, _own_forward(model, v, X, True, KEY, **kw)[0])
  assert st == {}


def test_train_keyword_follows_the_signature():
  plain, det = PlainConv(), DetConv()
  with pytest.raises(ValueError, match="takes no keyword 'train'.*train_kw=None"):
    _cut_l(plain, "body", train_kw="train")
  _cut_l(plain, "body", train_kw=None)  # forcing "no keyword" is always allowed
  # A model whose flag is inverted is adapted by a method= wrapper, detected by its signature.
  v = _init(det)
  cut = _cut_l(det, "body", method=lambda m, x, train: m(x, deterministic=not train))
  for train in (False, True):
    got = full_apply(cut, v, X, train, rng=KEY)[0]
    _close(got, _own_forward(det, v, X, False, KEY, deterministic=not train)[0])


# --------------------------------------------------------------------------------- 3: dropout
@pytest.mark.parametrize("bn", [False, True])
def test_linen_dropout_masks_are_the_models_own(bn):
  model = DropConv(bn=bn)
  v = _init(model)
  cut = _cut_l(model, "body")
  f = jax.jit(lambda v, x, rng: full_apply(cut, v, x, True, rng=rng))
  got, st = f(v, X, KEY)
  want, want_st = _own_forward(model, v, X, True, KEY, train=True)
  _close(got, want)
  _close(st, want_st)
  assert not np.allclose(got, f(v, X, KEY2)[0])  # the key is used
  _close(full_apply(cut, v, X, False)[0], _own_forward(model, v, X, False, train=False)[0])


def test_dropout_without_key_says_how_to_fix():
  model = DropConv()
  v = _init(model)
  with pytest.raises(ValueError, match="rng="):
    _cut_l(model, "body").lower(v, X, True)
  staged = DropStaged()
  with pytest.raises(ValueError, match="rng="):
    cut_staged(staged, "hidden").lower(_init(staged), X, True)


class DropStaged(nn.Module):
  """A staged model (lpa_jax's convention) with dropout on both sides of ``hidden``."""
  points = ("hidden", "logits")

  @nn.compact
  def __call__(self, x, train=False, start=None, stop=None):
    def hidden(h, train):
      h = nn.relu(nn.Dense(16, name="hidden_layer")(h.reshape(h.shape[0], -1)))
      return nn.Dropout(0.5, deterministic=not train, name="drop_lo")(h)

    def logits(h, train):
      return nn.Dense(C, name="head")(nn.Dropout(0.5, deterministic=not train)(h))
    return run_stages(self, [("hidden", hidden), ("logits", logits)], x, train, start, stop)


def test_staged_cut_passes_the_key():
  model = DropStaged()
  v = _init(model)
  got = jax.jit(lambda v: full_apply(cut_staged(model, "hidden"), v, X, True, rng=KEY)[0])(v)
  _close(got, model.apply(v, X, train=True, rngs={"dropout": KEY}))


# ------------------------------------------------------------------------------- NNX models
class NnxDrop(nnx.Module):
  """Conv, optional BatchNorm, ``nnx.Dropout`` below and above ``body``."""

  def __init__(self, bn: bool, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs) if bn else None
    self.drop_lo = nnx.Dropout(0.5, rngs=rngs)
    self.body = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.drop_hi = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    x = self.bn(x) if self.bn is not None else x
    x = nnx.relu(self.body(self.drop_lo(nnx.relu(x))))
    return self.head(self.drop_hi(x).mean((1, 2)))


def _cut_n(model, path="body"):
  return cut_nnx(model, path, input_shape=X.shape[1:])


@pytest.mark.parametrize("bn", [False, True])
def test_nnx_dropout_streams_round_trip(bn):
  model = NnxDrop(bn, nnx.Rngs(0))
  apply_fn, v = nnx_functional(model)
  assert ("batch_stats" in v) == bn
  f = jax.jit(lambda v, x: full_apply(_cut_n(model), v, x, True))
  ref = nnx.clone(model)
  ref.train()
  for _ in range(2):  # the returned streams feed the next call: fresh masks, as in the model
    got, st = f(v, X)
    _close(got, ref(X))
    _close(st, {k: s for k, s in nnx_functional(ref)[1].items() if k != "params"})
    _close(jax.jit(apply_fn, static_argnums=2)(v, X, True), (got, st))
    v = {**v, **st}


@pytest.mark.parametrize("bn", [False, True])
def test_nnx_key_reseeds_and_leaves_stored_streams(bn):
  model = NnxDrop(bn, nnx.Rngs(0))
  apply_fn, v = nnx_functional(model)
  f = jax.jit(lambda v, x, rng: full_apply(_cut_n(model), v, x, True, rng=rng))
  got, st = f(v, X, KEY)
  ref = nnx.clone(model)
  ref.train()
  reseed_nnx(ref, KEY)
  _close(got, ref(X))
  _close(st["nnx_state"], v["nnx_state"])  # the key stood in for the stored streams
  _close(apply_fn(v, X, True, rng=KEY), (got, st))
  assert not np.allclose(got, f(v, X, KEY2)[0])


# ------------------------------------------------------------------------------- 4: write back
@pytest.mark.parametrize("bn", [False, True])
def test_nnx_state_writes_back_into_the_model(bn):
  model = NnxDrop(bn, nnx.Rngs(0))
  _, v = nnx_functional(model)
  params = jax.tree.map(lambda p: p + 1.0, v["params"])  # as if trained
  _, st = jax.jit(lambda v: full_apply(_cut_n(model), v, X, True))({**v, "params": params})
  ref = nnx.clone(model)
  nnx.update(ref, jax.tree.map(lambda p: p + 1.0, nnx.state(ref, nnx.Param)))
  ref.train()
  ref(X)  # the model's own training forward: its statistics and streams advance
  nnx.update(model, params, *st.values())  # the own-loop guide's write-back, BatchNorm or not
  _close(nnx.state(model), nnx.state(ref))


# ------------------------------------------------------------------------------------ 5: bf16
@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("path", ["body", "head"])
def test_bf16_model_stays_in_its_dtype(in_dtype, path):
  x = X.astype(in_dtype)
  model = Bf16Conv(cast_out=True) if in_dtype == jnp.bfloat16 else Bf16Conv()
  v = _init(model, x)
  want, want_st = _own_forward(model, v, x, True, train=True)
  cut = _cut_l(model, path, x)
  act, st = jax.jit(lambda v, x: cut.lower(v, x, True))(v, x)
  assert act.dtype == jnp.bfloat16
  up = jax.jit(lambda v, a: cut.upper(v, a, True))
  for a in (act, act.astype(jnp.float32) + 1e-3):  # a method may hand upper an f32 activation
    got, st2 = up({**v, **st}, a)
    assert got.dtype == want.dtype == jnp.bfloat16
  _close(up({**v, **st}, act)[0], want, tol=2e-2)
  _close({**st, **up({**v, **st}, act)[1]}["batch_stats"], want_st["batch_stats"], tol=2e-2)
  with pytest.raises(ValueError, match="input_dtype"):  # the placeholder would be f32
    cut_linen(model, path, input_shape=x.shape[1:]).lower(v, x.astype(jnp.bfloat16), True)


def test_upper_rejects_an_activation_of_the_wrong_shape():
  model = PlainConv()
  v = _init(model)
  with pytest.raises(ValueError, match="body"):
    _cut_l(model, "body").upper(v, jnp.zeros((B, HW, HW, 5)), False)


# ------------------------------------------------------------------------------- 6: stateless
def _held(fn, seen=None) -> list:
  """Everything ``fn`` closes over, through nested closures and default arguments."""
  seen = set() if seen is None else seen
  if id(fn) in seen:
    return []
  seen.add(id(fn))
  found = []
  for obj in [c.cell_contents for c in fn.__closure__ or ()] + list(fn.__defaults__ or ()):
    found.append(obj)
    if isinstance(obj, functools.partial):
      found += [obj.func, *obj.args, *obj.keywords.values()]
      obj = obj.func
    if isinstance(obj, types.FunctionType):
      found += _held(obj, seen)
  return found


def _is_immutable(obj) -> bool:
  if isinstance(obj, tuple):
    return all(map(_is_immutable, obj))
  if isinstance(obj, functools.partial):  # its contents are checked one by one
    return True
  if isinstance(obj, (str, int, float, bool, type(None), np.dtype, nnx.GraphDef, nn.Module,
                      types.FunctionType, types.BuiltinFunctionType)) or inspect.isclass(obj):
    return True
  return False


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_cuts_are_stateless(kind):
  if kind == "linen":
    model = DropConv(bn=True)
    v, cut = _init(model), _cut_l(model, "body")
  else:
    model = NnxDrop(True, nnx.Rngs(0))
    v, cut = nnx_functional(model)[1], _cut_n(model)
  held = [o for f in (cut.lower, cut.upper) for o in _held(f)]
  assert held and all(map(_is_immutable, held)), [type(o) for o in held if not _is_immutable(o)]
  # upper needs no earlier lower, and each trace takes its batch size from its own arguments.
  up = jax.jit(lambda v, a: cut.upper(v, a, True, rng=KEY)[0])
  act3 = jnp.ones((3, HW, HW, 8))
  assert up(v, act3).shape == (3, C)
  act = jax.jit(lambda v, x: cut.lower(v, x, True, rng=KEY)[0])(v, X)
  assert act.shape == (B, HW, HW, 8) and up(v, act).shape == (B, C)
  assert up(v, act3).shape == (3, C)


def test_foreign_cuts_need_the_input_shape():
  with pytest.raises(ValueError, match="input_shape=x.shape"):
    cut_linen(PlainConv(), "body")
  with pytest.raises(ValueError, match="input_shape=x.shape"):
    cut_nnx(NnxDrop(False, nnx.Rngs(0)), "body")


def test_wrong_paths_list_valid_ones():
  model = PlainConv()
  with pytest.raises(ValueError, match="valid module paths are: body, head, stem"):
    _cut_l(model, "neck").lower(_init(model), X, False)
  with pytest.raises(ValueError, match="body, drop_hi, drop_lo, head, stem"):
    _cut_n(NnxDrop(False, nnx.Rngs(0)), "neck")


# ------------------------------------------------------------------ the library's train step
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_train_step_on_dropout_models(kind):
  if kind == "linen":
    model = DropConv(bn=True)
    variables, cut = _init(model), _cut_l(model, "body")
  else:
    model = NnxDrop(False, nnx.Rngs(0))
    variables, cut = nnx_functional(model)[1], _cut_n(model)
  act = place(lpa(C, split="all_positive", eps=0.3, depth=1), cut)
  tx = optax.sgd(0.1)
  params = variables.pop("params")
  state = TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params), act.init(),
                     (), jax.random.PRNGKey(3))
  step = jax.jit(make_train_step(act, identity(), tx, StepConfig(2, C)))
  batch = {"image": X, "label": jnp.arange(B) % C}
  new, metrics = step(state, batch)
  _, metrics2 = step(state, batch)  # the same state: the same dropout masks and PGD
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) == float(metrics2["loss"])
  assert jax.tree.structure(new.model_state) == jax.tree.structure(state.model_state)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, params)
  assert max(jax.tree.leaves(moved)) > 0
  step(new, batch)  # the output state feeds back in


# ------------------------------------------------------ a point that does not separate the model
class SkipOver(nn.Module):
  """A residual connection jumps over ``body``: upper alone cannot compute the output."""
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    return nn.Dense(C, name="head")((nn.Conv(8, (3, 3), name="body")(h) + h).mean((1, 2)))


class Unused(nn.Module):
  """``body`` runs, but the output does not use it."""
  @nn.compact
  def __call__(self, x, train=False):
    nn.Conv(8, (3, 3), name="body")(x)
    return nn.Dense(C, name="head")(jnp.ones((x.shape[0], 4), x.dtype))


class RematAbove(nn.Module):
  """Rematerialised and jitted-function layers above the point (the check looks through them)."""
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Conv(8, (3, 3), name="body")(x))
    h = nn.remat(nn.Conv)(8, (3, 3), name="above")(jax.nn.gelu(h))
    return nn.Dense(C, name="head")(jax.nn.softmax(h, axis=-1).mean((1, 2)))


class NnxSkip(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.body = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    return self.head((self.body(h) + h).mean((1, 2)))


def _upper_jit(cut, v, act):
  return jax.jit(lambda v, a: cut.upper(v, a, True, rng=KEY)[0])(v, act)


def test_a_skip_connection_over_the_point_is_refused_not_computed_from_the_placeholder():
  model = SkipOver()
  v = _init(model)
  act = _cut_l(model, "body").lower(v, X, True, rng=KEY)[0]
  with pytest.raises(ValueError, match="does not separate SkipOver.*bypasses 'body'"):
    _upper_jit(_cut_l(model, "body"), v, act)
  with pytest.raises(ValueError, match="bypasses 'body'"):  # un-jitted too
    _cut_l(model, "body").upper(v, act, False)
  # What the check guards against: without it, lower + upper is not the model's forward.
  wrong = _upper_jit(_cut_l(model, "body", check=False), v, act)
  assert not np.allclose(wrong, model.apply(v, X), atol=1e-3)
  nmodel = NnxSkip(nnx.Rngs(0))
  nv, ncut = nnx_functional(nmodel)[1], _cut_n(nmodel)
  with pytest.raises(ValueError, match="does not separate the NNX model.*bypasses 'body'"):
    _upper_jit(ncut, nv, ncut.lower(nv, X, True)[0])


def test_an_output_that_ignores_the_point_is_refused():
  model = Unused()
  v = _init(model)
  with pytest.raises(ValueError, match="does not depend on 'body'.*changes nothing"):
    _upper_jit(_cut_l(model, "body"), v, jnp.ones((B, HW, HW, 8)))


def test_the_check_looks_through_remat_and_jitted_functions():
  model = RematAbove()
  v = _init(model)
  cut = _cut_l(model, "body")
  act = cut.lower(v, X, True, rng=KEY)[0]
  np.testing.assert_allclose(_upper_jit(cut, v, act), model.apply(v, X), rtol=1e-5, atol=1e-6)


class RematBody(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    return nn.Dense(C, name="head")(nn.relu(nn.remat(nn.Conv)(8, (3, 3), name="body")(h))
                                     .mean((1, 2)))


def test_a_point_inside_a_lifted_transform_is_refused_by_name():
  """Its output lives in the transform's trace: handing it out leaked a tracer (an
  UnexpectedTracerError far from the cause)."""
  model = RematBody()
  v = _init(model)
  with pytest.raises(ValueError, match="'body' runs inside a lifted transform.*parent"):
    jax.jit(lambda v, x: _cut_l(model, "body").lower(v, x, True, rng=KEY)[0])(v, X)
