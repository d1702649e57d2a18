"""The perturbation family (issue 4): one defining property per method, plus composition."""
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from experiments.data.task import TaskData
from lpa_jax.models import get_model
from experiments.configs import methods as defaults
from lpa_jax.perturb import activation, gradient, logit
from experiments import registry
from experiments import gradients
from lpa_jax.perturb.base import Batch, Perturbation, chain, identity
from experiments.registry import Context
from lpa_jax.perturb.hooks import cut_staged, full_apply
from lpa_jax.perturb.lpa import lpa
from lpa_jax.perturb.place import place
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import StepConfig, make_train_step

COUNTS = np.array([40, 20, 10, 5])


def setup(name="mlp", c=4, widths=(16, 8), shape=(6, 6, 1), b=8, seed=0):
  model = get_model(name, c, widths=widths)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (b,) + shape)
  variables = dict(model.init(k2, x, train=False))
  labels = jnp.arange(b) % c
  counts = COUNTS if c == 4 else np.full(c, 10)
  ctx = Context(c, counts, 10, 5, functools.partial(cut_staged, model), tuple(model.points))
  return ctx, variables, Batch(x, labels, jax.nn.one_hot(labels, c)), k3


def at(ctx, point, method):
  return place(method, ctx.cut_fn(point))


def forward(method, state, variables, batch, rng, train=True, **kw):
  """A placed (network-level) method's forward pass on ``batch``: ``Out`` with the logits."""
  return method.apply(state, batch.x, labels=batch.labels_B, variables=variables, rng=rng,
                      train=train, targets=batch.targets_BxC, **kw)


def lapply(method, state, z, batch, step):
  """A logit method's ``apply`` on ``batch``."""
  return method.apply(state, z, labels=batch.labels_B, targets=batch.targets_BxC, step=step)


def run(method, variables, batch, rng):
  return jax.jit(lambda r: forward(method, method.init(), variables, batch, r))(rng)


# --------------------------------------------------------------------------- activation level

def test_dropout_preserves_expectation_and_is_off_at_eval():
  ctx, v, batch, _ = setup()
  m = at(ctx, "logits", activation.dropout(rate=0.5))
  fwd = jax.jit(jax.vmap(lambda r: forward(m, (), v, batch, r)))(
      jax.random.split(jax.random.key(1), 2000))
  clean = fwd.clean_logits[0]
  # Each entry is 0 or 2z with equal odds: the mean of n draws has standard error |z|/√n.
  assert (jnp.abs(fwd.logits_BxC.mean(0) - clean) <= 5 * jnp.abs(clean) / np.sqrt(2000)).all()
  assert abs(float(jnp.mean(fwd.logits_BxC == 0)) - 0.5) < 0.02
  off = forward(m, (), v, batch, jax.random.key(0), False).logits_BxC
  np.testing.assert_allclose(off, clean, rtol=1e-5)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_noise_has_the_right_std(mode):
  ctx, v, batch, rng = setup(b=256)
  fwd = run(at(ctx, "logits", activation.noise(sigma=0.3, mode=mode)), v, batch, rng)
  clean = fwd.clean_logits
  n = fwd.logits_BxC - clean
  n = n / clean if mode == "multiplicative" else n
  assert abs(float(n.std()) - 0.3) < 0.02 and abs(float(n.mean())) < 0.03


@pytest.mark.parametrize("select", ["switch", "mask"])
def test_manifold_mixup_mixes_activations_and_targets_with_one_lambda(select):
  ctx, v, batch, _ = setup(b=4)           # labels 0..3: the class index names the sample
  m = activation.manifold_mixup([ctx.cut_fn("hidden1"), ctx.cut_fn("logits")], alpha=1.0,
                                  select=select)
  fwd_fn = jax.jit(lambda r: forward(m, (), v, batch, r))
  cut = ctx.cut_fn("hidden1")
  h = cut.lower(v, batch.x, True)[0]
  seen = set()
  for seed in range(12):
    fwd = fwd_fn(jax.random.key(seed))
    t = np.asarray(fwd.targets_BxC)
    moved = np.diag(t) < 1 - 1e-6         # sample i paired with π(i) != i keeps weight λ
    if not moved.any():
      continue
    perm = np.where(moved, np.argmax(t - 2 * np.eye(4), axis=1), np.arange(4))
    lam = float(np.diag(t)[moved][0])
    np.testing.assert_allclose(t, lam * np.eye(4) + (1 - lam) * np.eye(4)[perm], atol=1e-6)
    assert abs(lam - float(fwd.aux["mix_lambda"])) < 1e-6
    point = int(fwd.aux["mix_point"])
    seen.add(point)
    if point == 1:   # mixed at the logits: z' = λ z + (1−λ) z_π
      z = fwd.clean_logits
      expect = lam * z + (1 - lam) * z[perm]
    else:            # mixed at hidden1: z' = f_up(λ h + (1−λ) h_π)
      expect = cut.upper(v, lam * h + (1 - lam) * h[perm], True)[0]
    np.testing.assert_allclose(fwd.logits_BxC, expect, rtol=1e-4, atol=1e-5)
  assert seen == {0, 1}


def test_fgsm_delta_has_norm_eps_and_raises_each_loss():
  ctx, v, batch, rng = setup(b=16)
  fwd = run(at(ctx, "logits", activation.adversarial(eps=0.5, method="fgsm")), v, batch, rng)
  clean = fwd.clean_logits
  np.testing.assert_allclose(jnp.linalg.norm(fwd.logits_BxC - clean, axis=-1), 0.5, rtol=1e-5)
  ce = lambda z: optax.softmax_cross_entropy(z, batch.targets_BxC)  # noqa: E731
  assert (ce(fwd.logits_BxC) > ce(clean)).all()
  # Deeper, through the layers above: every class's loss still goes up, δ has norm β^(L−l)·ε.
  adv = activation.adversarial(eps=0.2, beta=0.5, depth=2, method="pgd", steps=3)
  fwd = run(at(ctx, "hidden1", adv), v, batch, rng)
  np.testing.assert_allclose(fwd.aux["delta_norm_C"], 0.2 * 0.5 ** 2, rtol=1e-4)
  assert (fwd.aux["loss_change_C"] > 0).all() and (fwd.aux["expansive_share_C"] >= 0).all()


def test_deep_augmentation_pca_projects_and_passes_gradients_straight_through():
  ctx, v, batch, rng = setup(b=8)
  m = at(ctx, "hidden2", activation.deep_augmentation(mode="pca", pca_frac=0.25))  # k = 2 of 8
  cut = ctx.cut_fn("hidden2")
  h = cut.lower(v, batch.x, True)[0]
  fwd = run(m, v, batch, rng)
  expect = cut.upper(v, activation.pca_project(h, 2), True)[0]
  np.testing.assert_allclose(fwd.logits_BxC, expect, rtol=1e-4, atol=1e-5)
  # The layers below get the gradient of the loss as if the activation had not been replaced.
  w = lambda p: {**v, "params": p}  # noqa: E731
  shift = activation.pca_project(h, 2) - h
  g_aug = jax.grad(lambda p: forward(m, (), w(p), batch, rng).logits_BxC.sum())(v["params"])
  g_ref = jax.grad(lambda p: cut.upper(w(p), cut.lower(w(p), batch.x, True)[0] + shift,
                                       True)[0].sum())(v["params"])
  chex.assert_trees_all_close(g_aug, g_ref, rtol=1e-4, atol=1e-6)


def test_every_registered_activation_method_builds_from_config_and_differentiates():
  """Traced only (``eval_shape``): the defining properties are run above; this checks that
  every config block builds and that the model state keeps its structure (``lax.switch``)."""
  ctx, v, batch, rng = setup("cnn", widths=(4, 8), shape=(8, 8, 1))
  pc = mlc.ConfigDict(dict(logit="none", gradient="none", **defaults.method_blocks("longtail")))
  for name in registry.ACTIVATION:
    pc.activation = name
    m = registry.make_activation(pc, ctx)

    def loss(params):
      fwd = forward(m, m.init(), {**v, "params": params}, batch, rng)
      return optax.softmax_cross_entropy(fwd.logits_BxC, fwd.targets_BxC).mean(), fwd
    (val, fwd), g = jax.eval_shape(jax.value_and_grad(loss, has_aux=True), v["params"])
    assert val.shape == () and jax.tree.structure(g) == jax.tree.structure(v["params"]), name
    assert jax.tree.structure(fwd.model_state) == jax.tree.structure(
        {"batch_stats": v["batch_stats"]}), name
    assert fwd.targets_BxC.shape == batch.targets_BxC.shape, name


# --------------------------------------------------------------------------------- logit level

def test_logit_adjustment_shifts_by_tau_log_prior_and_posthoc_subtracts_it():
  ctx, _, batch, _ = setup()
  z = jax.random.normal(jax.random.key(3), (8, 4))
  shift = 0.7 * np.log(COUNTS / COUNTS.sum())
  la = logit.logit_adjust(ctx.class_counts, tau=0.7, mode="loss")
  np.testing.assert_allclose(lapply(la, (), z, batch, 0).x, z + shift, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(la.predict((), z), z)
  ph = logit.logit_adjust(ctx.class_counts, tau=0.7, mode="posthoc")
  np.testing.assert_allclose(lapply(ph, (), z, batch, 0).x, z)
  np.testing.assert_allclose(ph.predict((), z), z - shift, rtol=1e-5, atol=1e-6)


def test_ldam_margins_and_drw_switch_on_at_the_right_step():
  ctx, _, batch, _ = setup()          # 5 epochs x 10 steps: DRW from step round(0.8·5)·10 = 40
  m_C = logit.ldam_margins(COUNTS)
  np.testing.assert_allclose(m_C * COUNTS ** 0.25, m_C[-1] * COUNTS[-1] ** 0.25, rtol=1e-6)
  assert m_C.max() == pytest.approx(0.5) and np.argmax(m_C) == 3
  m = logit.ldam(COUNTS, normalized_head=True, scale=30.0, batch_normalize=False,
                 num_epochs=5, steps_per_epoch=10)
  z = jax.random.normal(jax.random.key(4), (8, 4))
  apply = jax.jit(lambda s: lapply(m, (), z, batch, s))
  r0 = apply(39)
  out, w0 = r0.x, r0.weights_B
  np.testing.assert_allclose(out, 30.0 * (z - batch.targets_BxC * m_C), rtol=1e-5)
  np.testing.assert_allclose(w0, 1.0)
  r1 = apply(40)
  w1, aux = r1.weights_B, r1.aux
  cb = (1 - 0.9999) / (1 - 0.9999 ** COUNTS)
  np.testing.assert_allclose(w1, (cb * 4 / cb.sum())[batch.labels_B], rtol=1e-5)
  assert float(aux["drw_on"]) == 1.0


def test_lpl_equals_lpa_at_the_logits_where_the_spec_says():
  """LPA at ``l = L`` is a class-level logit perturbation, but its PGD projects onto the
  ε-ball while LPL takes K unprojected steps, so they agree exactly when the projection is
  harmless: (a) one step (T = K = 1, ε = α), any C; (b) C = 2, any K with ε = K·α, because
  there ``mean(p_i − e_c)`` always points along ``e_other − e_c`` whatever δ is."""
  for c, k in ((4, 1), (2, 5)):
    ctx, v, batch, rng = setup(c=c, b=12)
    signs = (1, -1, 1, -1)[:c]
    a = at(ctx, "logits", lpa(c, split="signs", signs=signs, eps=0.3 * k, steps=k, varied=False))
    got_lpa = run(a, v, batch, rng).logits_BxC
    p = logit.lpl(c, split="signs", signs=signs, alpha=0.3, steps=k)
    z = full_apply(ctx.cut_fn("logits"), v, batch.x, True)[0]
    got_lpl = jax.jit(lambda z: lapply(p, p.init(), z, batch, 0).x)(z)
    np.testing.assert_allclose(got_lpa, got_lpl, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got_lpl - z).max()) > 0.1


def test_lpl_varied_steps_and_longtail_split():
  ctx, _, batch, _ = setup()
  p = logit.lpl(4, class_counts=COUNTS, split="longtail", alpha=0.1, varied=True, steps_min=2,
                steps_max=6)
  st = p.init()
  np.testing.assert_array_equal(st.sign_C, [-1, -1, 1, 1])      # head = round(0.4·4) = 2
  z = jax.random.normal(jax.random.key(5), (8, 4))
  aux = lapply(p, st, z, batch, 0).aux
  # q_c = rank/3, τ = 1.5/3: gaps (.5, 1/6, 1/6, .5) → K_c = 2 + round(4·gap/max gap).
  np.testing.assert_array_equal(aux["lpl_steps_C"], [6, 3, 3, 6])
  norm_C = np.asarray(aux["lpl_delta_norm_C"])
  assert (norm_C <= 0.1 * np.array([6, 3, 3, 6]) + 1e-6).all() and norm_C[0] > norm_C[1] > 0


# ------------------------------------------------------------------------------ gradient level

def test_lpg_keeps_the_forward_and_moves_class_gradient_norms_by_eps():
  ctx, _, batch, _ = setup(b=16)
  m = gradient.lpg(4, split="signs", signs=(1, -1, 1, -1), eps=0.05, varied=False)
  z = jax.random.normal(jax.random.key(6), (16, 4))
  out = jax.jit(lambda z: lapply(m, m.init(), z, batch, 0).x)(z)
  np.testing.assert_array_equal(out, z)

  def class_grads(f):
    g = jax.jit(jax.grad(lambda z: optax.softmax_cross_entropy(f(z), batch.targets_BxC).mean()))(z)
    # Per-example gradients are B·∂(mean loss)/∂z_i; average them per class.
    return (batch.targets_BxC.T @ (16 * g)) / batch.targets_BxC.sum(0)[:, None]
  g0 = class_grads(lambda z: z)
  g1 = class_grads(lambda z: lapply(m, m.init(), z, batch, 0).x)
  n0, n1 = np.linalg.norm(g0, axis=1), np.linalg.norm(g1, axis=1)
  np.testing.assert_allclose(n1 - n0, [0.05, -0.05, 0.05, -0.05], rtol=1e-4)
  cos = np.sum(np.asarray(g0) * np.asarray(g1), 1) / (n0 * n1)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)      # direction kept


@pytest.mark.parametrize("form", ["atan", "tanh", "log"])
def test_gaf_bound_and_slope(form):
  f = gradient.gaf_fn(0.1, 20.0, form)
  g = jnp.linspace(-1e3, 1e3, 20001)
  h = 1e-4   # central difference: the slope at 0 is αβ = 2 (sign(g) has no derivative there)
  assert float((f(h) - f(-h)) / (2 * h)) == pytest.approx(2.0, rel=1e-3)
  bound = {"atan": 0.1 * np.pi / 2, "tanh": 0.1, "log": np.inf}[form]
  assert float(jnp.abs(f(g)).max()) <= bound * (1 + 1e-6)
  if form == "atan":
    assert float(f(1e6)) == pytest.approx(bound, rel=1e-5)
  tx = gradient.gaf(form=form)                     # a plain optax transform
  assert isinstance(tx, optax.GradientTransformation)
  up, _ = tx.update({"w": g}, tx.init(None))
  np.testing.assert_allclose(up["w"], f(g))


def test_sam_step_matches_a_two_pass_reference():
  ctx, v, batch, _ = setup(b=8)
  x = jax.random.normal(jax.random.key(7), (8, 6, 6, 1))
  model = get_model("mlp", 4, widths=(16, 8))
  lr, rho = 0.1, 0.05
  tx = gradients.sam(optax.sgd(lr), rho)
  cfg = StepConfig(10, 4)
  step = jax.jit(make_train_step(at(ctx, "logits", identity()), identity(), tx, cfg))
  params = v["params"]
  state = TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), (), (),
                     jax.random.key_data(jax.random.key(0)))
  new, _ = step(state, {"image": x, "label": batch.labels_B})

  def loss(p):
    z = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy(z, batch.targets_BxC).mean()
  g = jax.grad(loss)(params)
  adv = jax.tree.map(lambda w, d: w + rho * d / optax.tree.norm(g), params, g)
  expect = jax.tree.map(lambda w, d: w - lr * d, params, jax.grad(loss)(adv))
  chex.assert_trees_all_close(new.params, expect, rtol=1e-5, atol=1e-6)


def test_optax_gradient_methods_act_where_they_should():
  g = {"w": jnp.full((4,), 3.0)}
  clip = gradients.clip(1.0)
  np.testing.assert_allclose(optax.tree.norm(clip.update(g, clip.init(g))[0]), 1.0, rtol=1e-6)
  noise = gradients.grad_noise(0.01, 0.55)
  out, _ = noise.update(g, noise.init(g))
  assert 0 < float(jnp.abs(out["w"] - 3.0).max()) < 1.0
  gm = registry.make_gradient(mlc.ConfigDict(dict(gradient="lpg", lpg=defaults.gradient_blocks()[
      "lpg"])), setup()[0])
  assert isinstance(gm.logit, Perturbation) and gm.logit.level == "logit"
  assert gm.pre is None and gm.wrap is None


# --------------------------------------------------------------------------------- composition

def test_chain_composes_apply_weights_and_predict():
  ctx, _, batch, _ = setup()
  z = jax.random.normal(jax.random.key(8), (8, 4))
  m = chain(logit.logit_adjust(COUNTS, mode="posthoc"),
            logit.ldam(COUNTS, normalized_head=True, scale=1.0, drw_start_step=40))
  r = lapply(m, m.init(), z, batch, 49)
  out, w = r.x, r.weights_B
  np.testing.assert_allclose(out, z - batch.targets_BxC * logit.ldam_margins(COUNTS), rtol=1e-6)
  assert not np.allclose(w, 1.0)
  np.testing.assert_allclose(m.predict(m.init(), z), z - np.log(COUNTS / COUNTS.sum()), rtol=1e-6)


def test_lpa_lpl_sam_compose_in_one_train_step():
  from experiments.configs import longtail
  from experiments.train.build import build_run
  from lpa_jax.train.step import make_mesh
  c = longtail.get_config("quick")
  c.model.update(dict(name="mlp", kwargs=mlc.ConfigDict(dict(widths=(16, 8)))))
  c.optim.update(dict(batch_size=16, num_epochs=1))
  c.perturb.update(dict(activation="lpa", logit="lpl", gradient="sam"))
  counts = np.array([16, 8, 4, 4, 2, 2, 1, 1, 1, 1]) * 2
  y = np.repeat(np.arange(10), counts).astype(np.int32)
  rs = np.random.RandomState(0)
  img = lambda n: rs.randint(0, 256, (n, 8, 8, 1)).astype(np.uint8)  # noqa: E731
  data = TaskData("tiny", img(len(y)), y, img(16), np.arange(16) % 10, 10,
                  [str(i) for i in range(10)])
  run = build_run(c, data, make_mesh())
  state = run.init_state
  p0 = jax.device_get(state.params)
  state, metrics = run.train_step(state, run.batch_fn(state, 0, 0))
  m = jax.device_get(metrics)
  assert np.isfinite(m["loss"]) and "lpl_delta_norm_C" in m and "delta_norm_C" in m
  assert m["lpl_delta_norm_C"][:5].max() > 0 and m["delta_norm_C"].max() > 0  # both perturbed
  assert not np.allclose(jax.tree.leaves(p0)[0], jax.tree.leaves(jax.device_get(state.params))[0])
  assert run.predict(state, data.x_test).shape == (16,)
