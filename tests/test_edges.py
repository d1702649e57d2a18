"""Edges that used to mislead users (issue 19 §2), each now loud: labels outside [0, C), the
loss-change diagnostic under a custom loss, the one place for the radius depth, the balanced
split's first epoch, mismatched sizes, and misspelt keyword arguments."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpa_jax as lj
from experiments.data.pipeline import dataset_stats, normalize
from lpa_jax.models import get_model
from lpa_jax.perturb import activation, classes
from lpa_jax.perturb.base import identity
from lpa_jax.perturb.diagnostics import check_finite
from lpa_jax.perturb.hooks import cut_staged

C = 10


@pytest.fixture(scope="module")
def net(fmnist_lt):
  """An MLP cut at ``hidden1``, its variables and 96 real examples."""
  model = get_model("mlp", C, widths=(32, 16))
  x = normalize(fmnist_lt.x_train[:96], *dataset_stats("fashion_mnist"))
  y = jnp.asarray(fmnist_lt.y_train[:96])
  variables = model.init(jax.random.key(0), x[:1])
  cut = cut_staged(model, "hidden1")
  act = cut.lower(variables, x, True)[0]
  upper = lambda a: cut.upper(variables, a, True)[0]  # noqa: E731
  return model, variables, cut, x, y, act, upper


def _lpa(**kw):
  return lj.lpa(C, **{"split": "all_positive", "eps": 1.0, **kw})


# ------------------------------------------------------------------------ labels out of range
@pytest.mark.parametrize("bad", [C, -1])
def test_labels_outside_the_classes_are_rejected_outside_jit(net, bad):
  _, variables, cut, x, y, act, upper = net
  y_bad = y.at[3].set(bad)
  method = _lpa()
  with pytest.raises(ValueError, match=rf"lpa: labels must lie in \[0, {C}\).*e\.g\. {bad}"):
    method.apply(method.init(), act, labels=y_bad, upper=upper)
  with pytest.raises(ValueError, match=rf"lpa: labels must lie in \[0, {C}\)"):
    method.info["delta"](method.init(), upper, act, y_bad)
  with pytest.raises(ValueError, match=rf"perturbed_apply: labels must lie in \[0, {C}\)"):
    lj.perturbed_apply(method, cut, method.init(), variables, x, y_bad, jax.random.key(0))


def test_labels_outside_the_classes_are_counted_under_jit_and_raise_on_the_host(net):
  _, variables, cut, x, y, _, _ = net
  method = _lpa()
  f = jax.jit(lambda v, y: lj.perturbed_apply(method, cut, method.init(), v, x, y,
                                              jax.random.key(0)).aux)
  good = jax.device_get(f(variables, y))
  assert float(good["invalid_labels"]) == 0
  check_finite(good)  # valid labels: no error
  aux = jax.device_get(f(variables, y.at[0].set(C).at[5].set(-1)))
  assert float(aux["invalid_labels"]) == 2
  with pytest.raises(ValueError, match=rf"step 4 has 2 label\(s\) outside \[0, {C}\)"):
    check_finite(aux, step=4)


def test_the_library_train_step_reports_bad_labels_and_its_loop_check_stops(fmnist_lt):
  from conftest import small_config
  from experiments.train import loop
  from experiments.train.build import build_train_step
  from lpa_jax.train.step import make_mesh
  cfg = small_config(**{"perturb.activation": "none"})  # no activation method: the step counts
  step, state, batch_fn = build_train_step(cfg, fmnist_lt, make_mesh())
  batch = batch_fn(state, 0, 0)
  bad = {**batch, "label": jnp.asarray(batch["label"]).at[1].set(C)}
  state, metrics = step(state, bad)
  host = jax.device_get(metrics)
  assert float(host["invalid_labels"]) == 1
  with pytest.raises(ValueError, match=r"step 0 has 1 label\(s\) outside \[0, num_classes\)"):
    loop.check_step(host, 0)


# ---------------------------------------------------------- loss change under a custom loss
def test_loss_change_is_measured_in_the_loss_pgd_follows(net):
  """Under strong label smoothing PGD ascends the smoothed loss; the diagnostic must report
  that loss's change, which here is a different number from cross-entropy's."""
  _, variables, cut, x, y, act, upper = net
  smooth = lambda z, t: optax.softmax_cross_entropy(z, optax.smooth_labels(t, 0.9))  # noqa: E731
  method = _lpa(eps=3.0, beta=1.0)
  out = jax.jit(lambda v: lj.perturbed_apply(method, cut, method.init(), v, x, y,
                                             jax.random.key(0), loss_fn=smooth))(variables)
  aux = jax.device_get(out.aux)
  onehot = np.asarray(jax.nn.one_hot(y, C))
  per_class = lambda v: (v @ onehot) / np.maximum(onehot.sum(0), 1)  # noqa: E731
  t = jax.nn.one_hot(y, C)
  want = per_class(np.asarray(smooth(out.logits_BxC, t) - smooth(out.clean_logits, t)))
  ce = per_class(np.asarray(optax.softmax_cross_entropy(out.logits_BxC, t)
                            - optax.softmax_cross_entropy(out.clean_logits, t)))
  present = aux["present_C"] > 0
  np.testing.assert_allclose(aux["loss_change_C"], want, rtol=1e-4, atol=1e-6)
  assert np.all(aux["loss_change_C"][present] > 0)  # all positive: the followed loss rises
  assert np.abs(ce - want)[present].max() > 1e-2   # and it is not the cross-entropy change


# ----------------------------------------------------------------------- one place for depth
class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(C)(nn.relu(nn.Dense(8, name="block")(x)))


class _NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.block = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.block(x)))


def test_the_radius_depth_is_the_methods_not_the_cuts():
  with pytest.raises(TypeError, match="depth"):  # not a parameter of a cut (no shim)
    lj.cut_linen(_LinenNet(), "block", depth=2, input_shape=(4,))
  with pytest.raises(TypeError, match="depth"):
    lj.cut_nnx(_NnxNet(nnx.Rngs(0)), "block", depth=2, input_shape=(4,))
  # A cut carries no depth at all: the method is the one place it is set.
  assert "depth" not in lj.cut_linen(_LinenNet(), "block", input_shape=(4,))._fields
  assert "depth" not in lj.cut_nnx(_NnxNet(nnx.Rngs(0)), "block", input_shape=(4,))._fields
  # lpa(depth=) is what scales the radius: β^(L−l) ε.
  method = lj.lpa(C, split="all_positive", eps=1.0, beta=0.5, depth=2)
  radius = method.info["radii"](method.init(), jnp.ones((C, 3)), jnp.arange(C))
  np.testing.assert_allclose(radius, 0.25, rtol=1e-6)


# ---------------------------------------------------------------- the balanced first epoch
def test_balanced_split_says_when_there_is_no_split_yet(net):
  _, _, _, _, y, act, upper = net
  method = lj.lpa(C, eps=1.0)  # default split: balanced
  state = method.init()
  assert not bool(state.split_ready)
  out = method.apply(state, act, labels=y, upper=upper)
  assert float(out.aux["split_ready"]) == 0
  assert float(jnp.abs(out.x - act).max()) == 0  # δ = 0 before the first refresh
  state = method.refresh(out.state)
  assert bool(state.split_ready)
  out = method.apply(state, act, labels=y, upper=upper)
  assert float(out.aux["split_ready"]) == 1 and float(jnp.abs(out.x - act).max()) > 0


# ------------------------------------------------------------------------------ mismatches
def test_labels_and_activation_of_different_lengths_name_both(net):
  _, variables, cut, x, y, act, upper = net
  method = _lpa()
  with pytest.raises(ValueError, match="lpa: labels has 50 entries but the activation has a "
                                       "batch of 96"):
    method.apply(method.init(), act, labels=y[:50], upper=upper)
  with pytest.raises(ValueError, match="perturbed_apply: labels has 50 entries but the "
                                       "activation has a batch of 96"):
    lj.perturbed_apply(method, cut, method.init(), variables, x, y[:50])


def test_float_labels_are_refused_naming_the_dtype(net):
  _, variables, cut, x, y, act, upper = net
  method = _lpa()
  with pytest.raises(TypeError, match="lpa: labels must be integer class ids, got dtype "
                                      "float32"):
    method.apply(method.init(), act, labels=y.astype(jnp.float32), upper=upper)
  with pytest.raises(TypeError, match="perturbed_apply: labels must be integer"):
    jax.jit(lambda v: lj.perturbed_apply(method, cut, method.init(), v, x,
                                         y.astype(jnp.float32)))(variables)


def test_num_classes_unlike_the_models_outputs_names_both(net):
  _, variables, cut, x, y, act, upper = net
  method = lj.lpa(12, split="all_positive", eps=1.0)
  with pytest.raises(ValueError, match=r"num_classes=12, but the layers above the point "
                                       r"return logits of shape \(96, 10\)"):
    jax.jit(lambda a: method.apply(method.init(), a, labels=y, upper=upper))(act)


def test_class_counts_of_the_wrong_length_are_refused_at_build():
  with pytest.raises(ValueError, match=r"class_counts must hold one training count per class: "
                                       r"got shape \(9,\) for num_classes=10"):
    lj.lpa(C, split="longtail", class_counts=np.arange(1, 10))
  with pytest.raises(ValueError, match=r"got shape \(11,\) for num_classes=10"):
    classes.initial_split("balanced", C, class_counts=np.ones(11))


# ------------------------------------------------------------------ misspelt keyword args
@pytest.mark.parametrize("make", [identity, lambda: activation.dropout(0.1),
                                  lambda: activation.noise(0.1), _lpa],
                         ids=["identity", "dropout", "noise", "lpa"])
def test_misspelt_keyword_arguments_raise(net, make):
  _, _, _, _, y, act, upper = net
  method = make()
  with pytest.raises(TypeError, match="loss_fun"):
    method.apply(method.init(), act, labels=y, upper=upper, rng=jax.random.key(0), train=True,
                 loss_fun=None)
  out = method.apply(method.init(), act, labels=y, upper=upper, rng=jax.random.key(0),
                     train=True, targets=jax.nn.one_hot(y, C),
                     loss_fn=None)  # the real names still work
  assert out.x.shape == act.shape
