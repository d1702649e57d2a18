"""LPA properties on real Fashion-MNIST batches: directions, bounds, identity at ε = 0,
absent classes, stop-gradient, and the logit-level closed form."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.data.pipeline import dataset_stats, normalize
from lpa_jax.models import get_model
from lpa_jax.perturb import classes
from lpa_jax.perturb.base import Batch
from experiments.registry import Context
from lpa_jax.perturb.hooks import cut_staged, full_apply
from lpa_jax.perturb.lpa import lpa
from lpa_jax.perturb.place import place

C = 10


@pytest.fixture(scope="module")
def setup(fmnist_lt):
  model = get_model("mlp", C, widths=(32, 16))
  x = normalize(fmnist_lt.x_train[:96], *dataset_stats("fashion_mnist"))
  y = jnp.asarray(fmnist_lt.y_train[:96])
  variables = model.init(jax.random.key(0), x[:1])
  ctx = Context(C, fmnist_lt.class_counts(), 1, 1, functools.partial(cut_staged, model),
                model.points)
  return model, variables, Batch(x, y, jax.nn.one_hot(y, C)), ctx


def placed_lpa(ctx, point, **kw):
  """LPA built from hyper-parameters and placed at ``point`` of the context's model."""
  cut = ctx.cut_fn(point)
  return place(lpa(ctx.num_classes, class_counts=ctx.class_counts, depth=ctx.depth(point), **kw),
               cut)


def forward(method, state, variables, batch, rng, train=True):
  """A placed method's forward pass on ``batch``: ``Out`` with the logits."""
  return method.apply(state, batch.x, labels=batch.labels_B, variables=variables, rng=rng,
                      train=train, targets=batch.targets_BxC)


def _run(setup, **kw):
  model, variables, batch, ctx = setup
  method = placed_lpa(ctx, **kw)
  fwd = jax.jit(lambda v, b: forward(method, method.init(), v, b, jax.random.key(0)))(
      variables, batch)
  return method, fwd


SIGNS = tuple([1, -1] * (C // 2))


@pytest.mark.parametrize("point", ["hidden1", "hidden2", "logits"])
def test_positive_classes_lose_more_negative_less(setup, point):
  _, fwd = _run(setup, point=point, split="signs", signs=SIGNS, eps=2.0, beta=1.0)
  present = np.asarray(fwd.aux["present_C"]) > 0
  change = np.asarray(fwd.aux["loss_change_C"])
  signs = np.asarray(SIGNS)
  assert present.sum() >= 6
  assert np.all(change[present & (signs > 0)] > 0)
  assert np.all(change[present & (signs < 0)] < 0)


@pytest.mark.parametrize("normalize_step", [True, False])
@pytest.mark.parametrize("varied", [True, False])
def test_delta_norm_never_exceeds_class_radius(setup, normalize_step, varied):
  model, _, _, ctx = setup
  kw = dict(point="hidden1", split="longtail", eps=0.3, delta_eps=0.5, beta=0.6, steps=4,
            varied=varied, normalize=normalize_step)
  method, fwd = _run(setup, **kw)
  split = method.init().split
  radius = classes.class_radii(split, 0.3, 0.5, 0.6, ctx.depth("hidden1"), varied)
  norms = np.asarray(fwd.aux["delta_norm_C"])
  assert np.all(norms <= np.asarray(radius) + 1e-5)
  if normalize_step:  # T normalised steps of 2ε/T always reach the boundary
    present = np.asarray(fwd.aux["present_C"]) > 0
    np.testing.assert_allclose(norms[present], np.asarray(radius)[present], rtol=1e-4)


def test_absent_classes_get_zero(setup):
  model, variables, batch, ctx = setup
  keep = np.asarray(batch.labels_B) < 5
  sub = Batch(batch.x[keep], batch.labels_B[keep], batch.targets_BxC[keep])
  method = placed_lpa(ctx, point="hidden2", split="all_positive", eps=1.0)
  fwd = forward(method, method.init(), variables, sub, jax.random.key(0))
  norms = np.asarray(fwd.aux["delta_norm_C"])
  assert np.all(norms[5:] == 0) and np.all(norms[:5] > 0)


def test_zero_radius_is_the_plain_forward(setup):
  model, variables, batch, ctx = setup
  method = placed_lpa(ctx, point="hidden1", split="all_positive", eps=0.0, delta_eps=0.0)
  fwd = forward(method, method.init(), variables, batch, jax.random.key(0))
  plain, _ = full_apply(cut_staged(model, "logits"), variables, batch.x, True)
  np.testing.assert_array_equal(np.asarray(fwd.logits_BxC), np.asarray(plain))


def test_training_loss_sees_delta_as_a_constant(setup):
  """The parameter gradient equals that of a forward with the same δ frozen in by hand.

  δ is read off the method's own output (perturbed minus clean activation), not rebuilt with
  the PGD under test; were δ not held constant, the gradient would also flow through PGD's
  dependence on the parameters and differ from the frozen one."""
  model, variables, batch, ctx = setup
  method = placed_lpa(ctx, point="hidden1", split="signs", signs=SIGNS, eps=1.0, beta=1.0)
  cut = cut_staged(model, "hidden1")

  def loss_lpa(params):
    fwd = forward(method, method.init(), {"params": params}, batch, jax.random.key(0))
    return optax.softmax_cross_entropy(fwd.logits_BxC, batch.targets_BxC).mean(), fwd

  (_, fwd), g_lpa = jax.value_and_grad(loss_lpa, has_aux=True)(variables["params"])
  act = cut.lower(variables, batch.x, True)[0]
  raw = lpa(C, split="signs", signs=SIGNS, eps=1.0, beta=1.0, depth=ctx.depth("hidden1"))
  upper = lambda a: cut.upper(variables, a, True)[0]  # noqa: E731
  pert = raw.apply(raw.init(), act, labels=batch.labels_B, upper=upper).x - act
  assert float(jnp.abs(pert).max()) > 0.1
  # Same δ as the placed method used: the perturbed logits agree.
  np.testing.assert_allclose(upper(act + pert), fwd.logits_BxC, rtol=1e-5, atol=1e-5)

  def loss_frozen(params, pert):
    a = cut.lower({"params": params}, batch.x, True)[0]
    logits = cut.upper({"params": params}, a + pert, True)[0]
    return optax.softmax_cross_entropy(logits, batch.targets_BxC).mean()

  g_ref = jax.grad(loss_frozen)(variables["params"], pert)
  chex.assert_trees_all_close(g_lpa, g_ref, rtol=1e-5, atol=1e-6)


def _hidden1_loss(variables, batch, ctx):
  """``(loss_fn, act)`` for PGD at 'hidden1' written by hand: tables -> summed CE, logits."""
  cut = ctx.cut_fn("hidden1")
  act = cut.lower(variables, batch.x, True)[0]
  onehot = jax.nn.one_hot(batch.labels_B, C)

  def loss_fn(t):
    logits = cut.upper(variables, act + onehot @ t["hidden1"], True)[0]
    return optax.softmax_cross_entropy(logits, batch.targets_BxC).sum(), logits
  return loss_fn, act, onehot.sum(0)


def test_at_the_logits_lpa_is_a_class_level_logit_perturbation(setup):
  """With ``l = L`` the class gradient has the closed form mean_{i∈S_c}(p_i − e_c)."""
  model, variables, batch, ctx = setup
  eps, steps = 0.5, 3
  _, fwd = _run(setup, point="logits", split="signs", signs=SIGNS, eps=eps, beta=0.7,
                steps=steps)
  z = np.asarray(full_apply(cut_staged(model, "logits"), variables, batch.x, True)[0], np.float64)
  y = np.asarray(batch.labels_B)
  delta = np.zeros((C, C))
  for _ in range(steps):  # hand-written PGD with the closed-form gradient
    p = np.exp(z + delta[y] - (z + delta[y]).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for c in np.unique(y):
      g = (p[y == c] - np.eye(C)[c]).mean(0)
      delta[c] += SIGNS[c] * (2 * eps / steps) * g / np.linalg.norm(g)
      delta[c] *= min(1.0, eps / np.linalg.norm(delta[c]))
  np.testing.assert_allclose(np.asarray(fwd.logits_BxC), z + delta[y], rtol=1e-4, atol=1e-4)


def test_balanced_split_refreshes_from_epoch_statistics():
  stats = classes.ClassStats(jnp.array([10.0, 10, 10, 0]), jnp.array([9.0, 5, 1, 0]),
                             jnp.zeros(4), jnp.zeros(4))
  split = classes.refresh_split("balanced", classes.initial_split("balanced", 4), stats)
  # q = (.9, .5, .1), mean .5: class 2 is hard (P), 0 and 1 easy (N); unseen class 3 keeps 0.
  np.testing.assert_array_equal(np.asarray(split.sign_C), [-1, -1, 1, 0])


def test_longtail_split_puts_rare_classes_in_p():
  split = classes.initial_split("longtail", 4, class_counts=[500, 100, 50, 5])
  np.testing.assert_array_equal(np.asarray(split.sign_C), [-1, -1, 1, 1])


def test_bad_split_and_layer_raise_readable_errors(setup):
  _, _, _, ctx = setup
  with pytest.raises(ValueError, match="valid rules"):
    placed_lpa(ctx, point="hidden1", split="sideways")
  with pytest.raises(ValueError, match="hidden1, hidden2, logits"):
    placed_lpa(ctx, point="stage3")


def test_unrolled_pgd_equals_the_rolled_loop(setup):
  from lpa_jax.perturb.pgd import class_pgd
  _, variables, batch, ctx = setup
  loss_fn, act, count_C = _hidden1_loss(variables, batch, ctx)
  args = (loss_fn, {"hidden1": jnp.zeros((C, act.shape[1]))}, count_C,
          jnp.asarray(SIGNS, float), {"hidden1": jnp.full((C,), 0.7)}, 4)
  rolled = jax.jit(lambda: class_pgd(*args, unroll=False)[0])()
  unrolled = jax.jit(lambda: class_pgd(*args, unroll=True)[0])()
  np.testing.assert_allclose(rolled["hidden1"], unrolled["hidden1"], rtol=1e-5, atol=1e-6)
