"""Config-driven composition: several logit methods in order, one class split per run, gradient
noise per run seed, and the branch selection of multi-point methods."""
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from experiments.configs import methods
from lpa_jax.models import get_model
from experiments.data.longtail import longtail_counts
from lpa_jax.perturb import activation, classes, logit
from experiments import registry
from lpa_jax.perturb.base import Batch
from experiments.registry import Context
from lpa_jax.perturb.hooks import cut_staged
from lpa_jax.perturb.lpa import lpa

COUNTS = np.array([500, 300, 200, 100, 60, 40, 20, 10, 6, 5])


def _pc(**kw):
  pc = mlc.ConfigDict(dict(activation="none", logit="none", gradient="none",
                           **methods.method_blocks("longtail")))
  pc.update(kw)
  return pc


def _ctx(seed=0, model=None):
  model = model or get_model("mlp", 10, widths=(16, 8))
  return Context(10, COUNTS, 5, 4, functools.partial(cut_staged, model), tuple(model.points),
                 seed=seed)


def test_logit_methods_chain_in_the_order_given():
  ctx = _ctx()
  z = jnp.asarray(np.random.RandomState(0).randn(20, 10).astype(np.float32))
  y = jnp.arange(20) % 10
  b = Batch(z, y, jax.nn.one_hot(y, 10))
  both = registry.make_logit(_pc(logit="logit_adjust,lpl"), ctx)
  la = registry.make_logit(_pc(logit="logit_adjust"), ctx)
  lpl = registry.make_logit(_pc(logit="lpl"), ctx)
  kw = dict(labels=b.labels_B, targets=b.targets_BxC, step=0)
  got = both.apply(both.init(), z, **kw).x
  z_la = la.apply(la.init(), z, **kw).x
  np.testing.assert_allclose(got, lpl.apply(lpl.init(), z_la, **kw).x, rtol=1e-6)
  assert float(jnp.abs(got - z_la).max()) > 0.01  # LPL acted after LA
  with pytest.raises(ValueError, match="registered"):
    registry.make_logit(_pc(logit="logit_adjust,nope"), ctx)


def test_one_class_split_per_run():
  """LPA, LPL and LPG default to the same long-tail head, and differing rules are refused."""
  ctx = _ctx()
  pc = _pc(activation="lpa", logit="lpl", gradient="lpg")
  act = registry.make_activation(pc, ctx)
  lpl = registry.make_logit(pc, ctx)
  lpg = registry.make_gradient(pc, ctx).logit
  head = classes.default_num_head(10)
  assert head == 4
  for sign in (act.init().split.sign_C, lpl.init().sign_C, lpg.init().sign_C):
    np.testing.assert_array_equal(np.asarray(sign), [-1] * head + [1] * (10 - head))
  pc.lpl.num_head = 3
  with pytest.raises(ValueError, match="One class split per run: lpa.num_head=None but "
                                       "lpl.num_head=3"):
    registry.make_activation(pc, ctx)


def test_lpa_on_its_own_splits_at_the_median_count_as_the_spec_says():
  """SPEC §1: classes with a below-median count are P. LPL and LPG on their own keep the LPL
  paper's 4 of 10; in a config run all three share the run's head (above)."""
  counts = longtail_counts(5000, 10, 100)
  signs = lambda m: np.asarray(m.init().sign_C if hasattr(m.init(), "sign_C")  # noqa: E731
                               else m.init().split.sign_C)
  np.testing.assert_array_equal(signs(lpa(10, split="longtail", class_counts=counts)),
                                [-1] * 5 + [1] * 5)
  np.testing.assert_array_equal(signs(lpa(10, split="longtail", class_counts=counts[::-1])),
                                [1] * 5 + [-1] * 5)  # by count, not by index
  np.testing.assert_array_equal(signs(lpa(10, split="longtail", class_counts=counts,
                                          num_head=4)), [-1] * 4 + [1] * 6)
  np.testing.assert_array_equal(signs(lpa(7, split="longtail", class_counts=[9, 9, 5, 5, 5, 1, 1])),
                                [-1] * 5 + [1] * 2)  # ties at the median are head
  assert np.all(signs(lpa(4, split="longtail", class_counts=[3, 3, 3, 3])) == -1)
  np.testing.assert_array_equal(signs(logit.lpl(10, split="longtail", class_counts=counts)),
                                [-1] * 4 + [1] * 6)


def test_gradient_noise_draws_from_the_run_seed():
  g = {"w": jnp.zeros((64,))}

  def noise(seed):
    gm = registry.make_gradient(_pc(gradient="grad_noise"), _ctx(seed=seed))
    return np.asarray(gm.pre.update(g, gm.pre.init(g))[0]["w"])
  a, b, a2 = noise(0), noise(1), noise(0)
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - b).max() > 0 and np.abs(a).max() > 0


def _forward(m, state, variables, batch, rng, train=True):
  """A placed method's forward pass on ``batch``: ``Out`` with the logits."""
  return m.apply(state, batch.x, labels=batch.labels_B, variables=variables, rng=rng,
                 train=train, targets=batch.targets_BxC)


def _cnn_setup():
  """A small CNN's context, variables and a 20-example batch covering every class."""
  model = get_model("cnn", 10, widths=(4, 8, 8))
  x = jax.random.normal(jax.random.key(0), (20, 8, 8, 1))
  y = jnp.arange(20) % 10
  return _ctx(model=model), model.init(jax.random.key(1), x[:1]), Batch(x, y,
                                                                      jax.nn.one_hot(y, 10))


@pytest.mark.parametrize("name", [pytest.param("manifold_mixup", marks=pytest.mark.slow),
                                  "lpa_adaptive"])
def test_branch_selection_mask_and_switch_compute_the_same_step(name):
  """The two selections are one algorithm: identical outputs and states, and the one used is
  reported in the diagnostics."""
  ctx, v, batch = _cnn_setup()
  outs = {}
  for select in ("mask", "switch"):
    pc = _pc(activation=name)
    pc[name].select = select
    if name == "lpa_adaptive":
      pc[name].candidates = ("stage1", "stage2")
      pc[name].every = 1
      pc[name].eps = 0.3
      pc[name].radius_mode = "relative"
    m = registry.make_activation(pc, ctx)

    def loss(params, m=m):
      fwd = _forward(m, m.init(), {**v, "params": params}, batch, jax.random.key(2))
      return optax.softmax_cross_entropy(fwd.logits_BxC, fwd.targets_BxC).mean(), fwd
    outs[select] = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
  (l_m, f_m), g_m = outs["mask"]
  (l_s, f_s), g_s = outs["switch"]
  np.testing.assert_allclose(l_m, l_s, rtol=1e-5)
  np.testing.assert_allclose(f_m.logits_BxC, f_s.logits_BxC, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(g_m, g_s, rtol=1e-4, atol=1e-5)
  key = "mix_select_switch" if name == "manifold_mixup" else "layer_select_switch"
  assert float(f_m.aux[key]) == 0.0 and float(f_s.aux[key]) == 1.0


def test_input_cut_mixes_the_input():
  model = get_model("mlp", 10, widths=(8,))
  top = cut_staged(model, model.points[-1])
  cut = activation.input_cut(top)
  x = jnp.ones((3, 4, 4, 1))
  assert cut.lower({}, x, True)[0] is x


@pytest.mark.parametrize("name", ["cnn", "resnet20", "mlp"])
def test_default_point_has_a_nonlinear_f_up_and_the_logit_equivalent_one_is_affine(name):
  """Above the logit-equivalent point ``f_up`` is affine (pooling and the head), so LPA there
  is a logit shift; the default point sits one block/stage lower, where it is not."""
  model = get_model(name, 10, **({"widths": (8, 8)} if name == "mlp" else {}))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  v = model.init(jax.random.key(1), x[:1])

  def affine_gap(point):
    cut = cut_staged(model, point)
    a = cut.lower(v, x, False)[0]
    b = jax.random.normal(jax.random.key(2), a.shape)
    f = lambda h: cut.upper(v, h, False)[0]  # noqa: E731
    return float(jnp.abs(f(a + b) - f(a) - f(b) + f(jnp.zeros_like(a))).max())
  assert affine_gap(registry.logit_equivalent_point(model.points)) < 1e-4
  assert affine_gap(registry.default_point(model.points)) > 1e-3


def test_gaf_doubles_small_gradients_and_the_unit_slope_control_does_not():
  from lpa_jax.perturb import gradient
  g = {"w": jnp.array([1e-4, -1e-4, 10.0])}
  for unit, slope in ((False, 2.0), (True, 1.0)):
    gm = registry.make_gradient(_pc(gradient="gaf", gaf=mlc.ConfigDict(dict(
        alpha=0.1, beta=20.0, form="atan", where="raw", unit_slope=unit))), _ctx())
    out = np.asarray(gm.pre.update(g, gm.pre.init(g))[0]["w"])
    assert gm.post is None
    np.testing.assert_allclose(out[:2] / np.asarray(g["w"][:2]), slope, rtol=1e-3)
    assert out[2] < 0.1 * np.pi / 2 / (1.0 if not unit else 2.0) + 1e-6  # large ones compressed
  assert gradient.gaf_lr_factor(0.1, 20.0) == 2.0


@pytest.mark.parametrize("name", ["dropout", "noise", "deep_augmentation", "manifold_mixup"])
def test_random_methods_skip_the_clean_pass_unless_a_class_split_needs_it(name):
  ctx, v, batch = _cnn_setup()

  def run(logit, split):
    pc = _pc(activation=name, logit=logit)
    pc.lpl.split = split
    m = registry.make_activation(pc, ctx)
    f = jax.jit(lambda v: _forward(m, m.init(), v, batch, jax.random.key(2)))
    return f(v), f.lower(v).compile().cost_analysis()["flops"]
  fwd, flops = run("none", "longtail")
  assert fwd.clean_logits is None and "loss_change_C" not in fwd.aux
  assert "expansive_share_C" in fwd.aux and "delta_norm_C" in fwd.aux
  fwd_b, flops_b = run("lpl", "balanced")   # LPL re-splits from clean statistics
  assert fwd_b.clean_logits is not None and "loss_change_C" in fwd_b.aux
  assert flops < flops_b


def test_lpa_with_logit_adjust_then_lpl_trains_with_all_three_acting(tmp_path, fmnist_lt):
  """One epoch of the chain through the library's loop: LPA and LPL perturbed (their logged
  norms), and logit adjustment acted (the training loss differs from the run without it)."""
  import json
  from conftest import small_config
  from experiments.train.loop import train_and_evaluate

  def first_row(logit, workdir):
    cfg = small_config(**{"perturb.activation": "lpa", "perturb.logit": logit,
                          "optim.num_epochs": 1})
    res = train_and_evaluate(cfg, str(workdir), progress=False, data=fmnist_lt)
    assert np.isfinite(res["test_accuracy"])
    with open(workdir / "metrics.jsonl") as f:
      return json.loads(f.readline())
  row = first_row("logit_adjust,lpl", tmp_path / "chain")
  assert max(row["lpl_delta_norm_C"]) > 0 and max(row["delta_norm_C"]) > 0
  row_lpl = first_row("lpl", tmp_path / "lpl")
  assert not np.allclose(row["loss"], row_lpl["loss"], rtol=1e-3)


@pytest.mark.parametrize("overrides,reason", [
    ({"activation": "lpa", "lpa.eps": 0.0, "lpa.delta_eps": 0.0}, "lpa with eps=0 and delta_eps=0"),
    ({"activation": "lpa", "lpa.eps": 0.0, "lpa.varied": False}, r"eps=0 \(fixed radius\)"),
    ({"activation": "dropout", "dropout.rate": 0.0}, "dropout with rate=0"),
    ({"activation": "noise", "noise.sigma": 0.0}, "noise with sigma=0"),
    ({"activation": "adversarial", "adversarial.eps": 0.0}, "adversarial with eps=0"),
    ({"logit": "lpl", "lpl.alpha": 0.0}, "lpl with alpha=0"),
    ({"logit": "logit_adjust,lpl", "logit_adjust.tau": 0.0}, "logit_adjust with tau=0"),
    ({"gradient": "lpg", "lpg.eps": 0.0, "lpg.delta_eps": 0.0}, "lpg with eps=0 and delta_eps=0"),
    ({"gradient": "grad_noise", "grad_noise.eta": 0.0}, "grad_noise with eta=0"),
    ({"gradient": "sam", "sam.rho": 0.0}, "sam with rho=0"),
])
def test_a_selected_method_that_perturbs_nothing_is_refused(overrides, reason):
  from experiments.configs import common, longtail
  c = longtail.get_config("quick")
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = c.perturb
    for p in path:
      node = node[p]
    node[last] = value
  with pytest.raises(common.InvalidConfig, match=f"{reason} perturbs nothing"):
    common.validate(c)
  # The same block is fine while the method is not selected.
  for level in ("activation", "logit", "gradient"):
    c.perturb[level] = "none"
  common.validate(c)


def test_every_registered_method_has_one_defaults_block_and_one_registry_line():
  """Adding a method touches its module, its defaults block and one registry Entry: the
  registry and the defaults name the same methods, and the null rules and class-level flags
  live in the entries."""
  blocks = methods.method_blocks("longtail")
  names = {n for t in registry.TABLES.values() for n in t if n != "none"}
  assert names == set(blocks)
  assert {n for n in names if registry.entry(n).class_level} == {"lpa", "lpa_adaptive", "lpl",
                                                                  "lpg"}
  for name in names:  # each null rule reads only fields of its own block
    e = registry.entry(name)
    if e.null is not None:
      assert e.null(blocks[name]) is None, name   # the defaults perturb
