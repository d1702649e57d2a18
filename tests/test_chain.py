"""Logit methods from hyper-parameters alone, composed with ``chain`` (issue 19 §1).

Everything a user needs comes from ``lpa_jax.perturb``: no run ``Context``, no registry."""
import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpa_jax.perturb import (Batch, chain, clip, cut_linen, gaf, grad_noise, identity_logits, ldam,
                             logit_adjust, lpa, lpg, lpg_logits, lpl, perturbed_apply,
                             pgd_loss_of, sam)
from lpa_jax.perturb.logit import drw_start

C, B = 4, 16
COUNTS = np.array([40, 20, 10, 5])
Z = jax.random.normal(jax.random.key(0), (B, C))
Y = jnp.arange(B) % C
BATCH = Batch(None, Y, jax.nn.one_hot(Y, C))


class Net(nn.Module):
  """A Linen model lpa_jax did not write: cut at ``hidden``."""
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="hidden")(x))
    return nn.Dense(C, name="head")(h)


def _la():
  return logit_adjust(COUNTS, tau=1.0)


def _lpl():
  return lpl(C, split="longtail", class_counts=COUNTS, alpha=0.2, steps=3)


def _lpg():
  return lpg_logits(C, split="longtail", class_counts=COUNTS, eps=0.3, varied=False)


def _run(m, z=Z, batch=BATCH, step=0):
  return m.apply(m.init(), z, batch, step)


def _ce(z, batch=BATCH):
  return optax.softmax_cross_entropy(z, batch.targets_BxC).mean()


# ----------------------------------------------------------------------------- composition

def test_lpa_then_la_and_lpl_compose_without_a_context():
  """LPA's PGD follows the chained LA + LPL loss, and the chain applies LA then LPL."""
  x = jax.random.normal(jax.random.key(1), (B, 6))
  model = Net()
  variables = model.init(jax.random.key(2), x)
  cut = cut_linen(model, "hidden", input_shape=(6,))
  la, lp = _la(), _lpl()
  logit = chain(la, lp)
  method = lpa(C, split="longtail", class_counts=COUNTS, eps=0.5, varied=False)
  batch = BATCH._replace(x=x)
  loss_fn = pgd_loss_of(logit, logit.init(), batch, 0)
  out = perturbed_apply(method, cut, method.init(), variables, x, Y, loss_fn=loss_fn)
  z, w_B, _, aux = logit.apply(logit.init(), out.logits_BxC, batch, 0)
  by_hand = lp.apply(lp.init(), la.apply(la.init(), out.logits_BxC, batch, 0)[0], batch, 0)[0]
  np.testing.assert_array_equal(z, by_hand)
  np.testing.assert_array_equal(w_B, 1.0)
  assert set(aux) == {"lpl_delta_norm_C", "lpl_steps_C"}

  def by_hand_loss(logits, targets):  # w_B · CE(LPL(LA(z)))
    b = batch._replace(targets_BxC=targets)
    zz = lp.apply(lp.init(), la.apply((), logits, b, 0)[0], b, 0)[0]
    return optax.softmax_cross_entropy(zz, targets)
  ref = perturbed_apply(method, cut, method.init(), variables, x, Y, loss_fn=by_hand_loss)
  np.testing.assert_allclose(out.logits_BxC, ref.logits_BxC, rtol=1e-6, atol=1e-6)
  plain = perturbed_apply(method, cut, method.init(), variables, x, Y)  # cross-entropy PGD
  assert float(jnp.abs(out.logits_BxC - plain.logits_BxC).max()) > 1e-4


def test_la_lpl_lpg_chain_in_order_with_lpg_on_the_gradient_only():
  la, lp, g = _la(), _lpl(), _lpg()
  three, two = chain(la, lp, g), chain(la, lp)
  assert len(three.init()) == 3
  z3, w3, _, aux3 = _run(three)
  np.testing.assert_array_equal(z3, _run(two)[0])             # LPG keeps the forward
  assert set(aux3) == {"lpl_delta_norm_C", "lpl_steps_C", "lpg_radius_C"}
  np.testing.assert_array_equal(w3, 1.0)

  def grad(f):
    return jax.jit(jax.grad(lambda z: _ce(f(z))))(Z)
  got = grad(lambda z: _run(three, z)[0])
  want = grad(lambda z: g.apply(g.init(), _run(two, z)[0], BATCH, 0)[0])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(got - grad(lambda z: _run(two, z)[0])).max()) > 1e-4
  # PGD follows the training loss, which LPG leaves alone.
  t = BATCH.targets_BxC
  np.testing.assert_array_equal(pgd_loss_of(three, three.init(), BATCH, 0)(Z, t),
                                pgd_loss_of(two, two.init(), BATCH, 0)(Z, t))
  state = three.refresh(three.init(), None, 1)
  assert len(state) == 3


def test_class_level_logit_methods_keep_their_own_statistics_and_refresh_from_them():
  """LPL (balanced split) starts with no direction, gathers the batch's statistics from the
  clean logits a chain was given, and re-splits from them at refresh: below-mean classes
  expansive."""
  lp = lpl(C, split="balanced", alpha=0.1, steps=2)
  m = chain(_la(), lp)
  out = m.apply(m.init(), Z, BATCH, 0)
  own = out.state[1]
  np.testing.assert_array_equal(own.sign_C, 0.0)                       # no split yet
  np.testing.assert_array_equal(own.stats.count_C, np.asarray(BATCH.targets_BxC.sum(0)))
  prob_C = np.asarray((jax.nn.softmax(Z) * BATCH.targets_BxC).sum(-1) @ BATCH.targets_BxC)
  np.testing.assert_allclose(own.stats.prob_sum_C, prob_C, rtol=1e-5)  # Z, not LA's output
  new = m.refresh(out.state)
  q_C = prob_C / np.maximum(np.asarray(BATCH.targets_BxC.sum(0)), 1)
  seen = np.asarray(BATCH.targets_BxC.sum(0)) > 0
  want = np.where(seen, np.where(q_C < q_C[seen].mean(), 1.0, -1.0), 0.0)
  np.testing.assert_array_equal(new[1].sign_C, want)
  np.testing.assert_array_equal(new[1].stats.count_C, 0.0)              # a fresh epoch


def test_chain_order_matters_where_it_should():
  la, lp = _la(), _lpl()
  la_then_lpl, lpl_then_la = _run(chain(la, lp))[0], _run(chain(lp, la))[0]
  assert float(jnp.abs(la_then_lpl - lpl_then_la).max()) > 1e-3  # LPL's δ sees LA's shift
  half = logit_adjust(COUNTS[::-1], tau=0.5)
  np.testing.assert_allclose(_run(chain(la, half))[0], _run(chain(half, la))[0], rtol=1e-6)


def test_predict_weights_and_nesting():
  ph, ph2 = logit_adjust(COUNTS, mode="posthoc"), logit_adjust(COUNTS[::-1], mode="posthoc")
  m = chain(ph, ph2)
  prior = np.log(COUNTS / COUNTS.sum())
  np.testing.assert_allclose(m.predict(m.init(), Z), Z - prior - prior[::-1], rtol=1e-5,
                             atol=1e-6)
  drw = ldam(COUNTS, normalized_head=True, drw_start_step=0, batch_normalize=False)
  w_ldam, w_lpg = _run(drw)[1], _run(_lpg())[1]
  np.testing.assert_array_equal(_run(chain(drw, _la(), _lpg()))[1], w_ldam * w_lpg)
  assert not np.allclose(w_ldam, 1.0)
  flat, nested = chain(_la(), _lpl(), _lpg()), chain(chain(_la(), _lpl()), _lpg())
  assert jax.tree.structure(nested.init()) != jax.tree.structure(flat.init())
  np.testing.assert_array_equal(_run(nested)[0], _run(flat)[0])


def test_chain_of_none_or_one_is_that_method():
  lp = _lpl()
  assert chain(lp) is lp
  z, w_B, _, aux = _run(chain())
  np.testing.assert_array_equal(z, Z)
  assert chain().init() == identity_logits().init() == () and aux == {}


def test_chain_refuses_clashing_aux_and_gradient_methods():
  twice = chain(_lpl(), lpl(C, split="all_positive", alpha=0.1))
  with pytest.raises(ValueError, match="methods 0 and 1 both report aux 'lpl_delta_norm_C'"):
    _run(twice)
  with pytest.raises(TypeError, match=r"argument 1 is a .*not a LogitMethod: gradient "
                                      r"transforms go into the optimiser"):
    chain(_la(), gaf())
  np.testing.assert_array_equal(_run(chain(_la(), lpg(C)))[0], _run(_la())[0])


def test_the_readme_la_lpl_step_trains_on_the_chained_loss():
  """The README's ``logit-chain`` block, run on a tiny 10-class model."""
  import lpa_jax as lj
  from flax.training import train_state
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  source = re.search(r"```python readme-test:logit-chain\n(.*?)```", text, flags=re.S).group(1)

  class TrainState(train_state.TrainState):
    model_state: dict

  class Net10(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(8, name="block2")(x)))
  x, y = jax.random.normal(jax.random.key(3), (20, 6)), jnp.arange(20) % 10
  counts = np.array([100, 60, 40, 30, 20, 10, 8, 6, 4, 2])
  variables = dict(Net10().init(jax.random.key(4), x))
  state = TrainState.create(apply_fn=None, params=variables.pop("params"),
                            tx=optax.sgd(0.1), model_state=variables)
  ns = dict(jax=jax, jnp=jnp, optax=optax, lj=lj, counts=counts, state=state,
            cut=lj.cut_linen(Net10(), "block2", input_shape=(6,)),
            lpa=lj.lpa(10, split="longtail", class_counts=counts, eps=0.5))
  exec(compile(source, "README.md[logit-chain]", "exec"), ns)  # noqa: S102
  new, _, lstate, loss = ns["train_step_la_lpl"](state, ns["lpa"].init(), ns["logit"].init(),
                                                 x, y, jax.random.key(5))
  logit, batch = ns["logit"], Batch(x, y, jax.nn.one_hot(y, 10))
  out = perturbed_apply(ns["lpa"], ns["cut"], ns["lpa"].init(), {"params": state.params}, x, y,
                        jax.random.key(5), loss_fn=pgd_loss_of(logit, logit.init(), batch, 0))
  want = _ce(logit.apply(logit.init(), out.logits_BxC, batch, 0)[0], batch)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert abs(float(want) - float(_ce(out.logits_BxC, batch))) > 1e-3   # LA + LPL acted
  assert int(new.step) == 1
  # LPL's state gathered the batch's class statistics from the clean logits (before LPA's δ
  # and LA's shift); LA keeps no state.
  stats = lstate[1].stats
  np.testing.assert_array_equal(stats.count_C, np.bincount(np.asarray(y), minlength=10))
  prob = jnp.sum(jax.nn.softmax(out.clean_logits) * batch.targets_BxC, -1)
  np.testing.assert_allclose(stats.prob_sum_C, prob @ batch.targets_BxC, rtol=1e-5)
  assert lstate[0] == ()


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("make,match", [
    (lambda: lpl(0), r"lpl.num_classes must be a positive int, got 0"),
    (lambda: lpl(4.0), r"lpl.num_classes must be a positive int, got 4.0"),
    (lambda: lpl(C, split="longtail"), r"lpl: split='longtail' needs the training class counts"),
    (lambda: lpl(C, split="nope"), r"lpl: Unknown split rule 'nope'"),
    (lambda: lpl(C, class_counts=[1, 2, 3]),
     r"lpl.class_counts must hold one training count per class: got shape \(3,\) for "
     r"num_classes=4"),
    (lambda: lpl(C, alpha=-0.1), r"lpl.alpha must be >= 0, got -0.1"),
    (lambda: lpl(C, alpha=1e30), r"lpl.alpha=1e\+30 with up to 40 steps .* = 4e\+31 logits, "
                                 r"above 100, where softmax is saturated"),
    (lambda: lpl(C, alpha=3.0, steps=40, steps_max=10), r"lpl.alpha=3 with up to 40 steps"),
    (lambda: lpl(C, alpha=math.nan), r"lpl.alpha must be finite"),
    (lambda: lpl(C, steps=2.5), r"lpl.steps must be an int >= 0, got 2.5"),
    (lambda: lpl(C, steps_min=5, steps_max=3), r"lpl.steps_min must be <= lpl.steps_max"),
    (lambda: logit_adjust(None), r"logit_adjust needs class_counts"),
    (lambda: logit_adjust([3, -1]), r"logit_adjust.class_counts must be finite counts >= 0"),
    (lambda: logit_adjust(np.ones((2, 2))), r"logit_adjust.class_counts must hold one .*\(2, 2\)"),
    (lambda: logit_adjust(COUNTS, tau=math.inf), r"logit_adjust.tau must be finite"),
    (lambda: logit_adjust(COUNTS, mode="both"), r"logit_adjust.mode must be one of"),
    (lambda: ldam(COUNTS), r"ldam needs a normalised \(cosine\) classifier"),
    (lambda: ldam(COUNTS, normalized_head=True), r"ldam with drw=True needs to know when DRW"),
    (lambda: ldam(COUNTS, normalized_head=True, num_epochs=5),
     r"ldam: num_epochs and steps_per_epoch go together; steps_per_epoch is missing"),
    (lambda: ldam(COUNTS, normalized_head=True, drw_start_step=3, num_epochs=5,
                  steps_per_epoch=2), r"ldam: give drw_start_step, or num_epochs .* not both"),
    (lambda: ldam(COUNTS, normalized_head=True, drw_start_step=-1),
     r"ldam.drw_start_step must be an int >= 0, got -1"),
    (lambda: ldam(COUNTS, normalized_head=True, num_epochs=0, steps_per_epoch=2),
     r"ldam needs num_epochs >= 1"),
    (lambda: ldam(COUNTS, normalized_head=True, drw=False, drw_beta=1.0),
     r"ldam.drw_beta must lie in \[0, 1\)"),
    (lambda: ldam(COUNTS, normalized_head=True, drw=False, scale=0.0), r"scale > 0"),
    (lambda: ldam(COUNTS, normalized_head=True, drw=False, drw_fraction=1.5),
     r"ldam.drw_fraction must lie in \[0, 1\]"),
    (lambda: lpg(C, eps=-1.0), r"lpg needs eps >= 0"),
    (lambda: lpg_logits(C, delta_eps=math.nan), r"lpg.delta_eps must be finite"),
    (lambda: lpg(C, split="longtail"), r"lpg: split='longtail' needs the training class counts"),
])
def test_bad_arguments_name_the_argument(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_hyper_parameters_are_keyword_only_and_ldam_schedules_agree():
  with pytest.raises(TypeError):
    lpl(C, "longtail")
  with pytest.raises(TypeError):
    logit_adjust(COUNTS, 1.0)
  by_epochs = ldam(COUNTS, normalized_head=True, num_epochs=200, steps_per_epoch=10)
  by_step = ldam(COUNTS, normalized_head=True, drw_start_step=drw_start(200, 10))
  assert drw_start(200, 10) == 1600
  for step in (1599, 1600):
    for a, b in zip(_run(by_epochs, step=step), _run(by_step, step=step)):
      np.testing.assert_array_equal(jax.tree.leaves(a), jax.tree.leaves(b))
  assert float(_run(ldam(COUNTS, normalized_head=True, drw=False), step=10**6).aux["drw_on"]) == 0


def test_every_gradient_method_goes_into_a_users_own_optimiser():
  """GAF, clipping, noise and SAM are optax transforms chained (or, SAM, wrapped) into the
  user's optimiser from the public names alone; LPG is a logit method.  Each changes the
  update plain SGD would make, and GAF after the momentum trace acts on its output."""
  model = nn.Dense(C)
  x = jax.random.normal(jax.random.key(0), (B, 6))
  y = jnp.arange(B) % C
  params = model.init(jax.random.key(1), x)["params"]

  def loss(p, logit=None):
    z = model.apply({"params": p}, x)
    if logit is not None:
      z, _, _, _ = logit.apply(logit.init(), z, Batch(x, y, jax.nn.one_hot(y, C)), 0)
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

  def update(tx, logit=None):
    g = jax.grad(loss)(params, logit)
    extra = {"grad_fn": lambda p, _: jax.grad(loss)(p, logit)} if tx is not None else {}
    tx = tx or optax.sgd(0.1, momentum=0.9)
    u, _ = tx.update(g, tx.init(params), params, **extra)
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(u)])

  plain = update(optax.sgd(0.1, momentum=0.9))
  txs = {"clip": optax.chain(clip(1e-3), optax.sgd(0.1, momentum=0.9)),
         "noise": optax.chain(grad_noise(0.01, 0.55, seed=3), optax.sgd(0.1, momentum=0.9)),
         "gaf raw": optax.chain(gaf(0.1, 20.0), optax.sgd(0.1, momentum=0.9)),
         "gaf momentum": optax.chain(optax.trace(0.9), gaf(0.1, 20.0), optax.sgd(0.1)),
         "sam": sam(optax.sgd(0.1, momentum=0.9), rho=0.05)}
  for name, tx in txs.items():
    assert np.abs(update(tx) - plain).max() > 1e-6, name
  g = jax.grad(loss)(params)
  expect = -0.1 * 0.1 * np.arctan(20.0 * np.concatenate([np.ravel(v) for v in
                                                           jax.tree.leaves(g)]))
  np.testing.assert_allclose(update(txs["gaf momentum"]), expect, rtol=1e-5, atol=1e-8)
  lpg_up = update(None, lpg(C, split="signs", signs=(1, -1, 1, -1), eps=0.5, varied=False))
  assert np.abs(lpg_up - plain).max() > 1e-6
  for bad in (lambda: gaf(alpha=0.0), lambda: sam(optax.sgd(0.1), rho=0.0),
              lambda: clip(-1.0), lambda: grad_noise(float("nan"))):
    with pytest.raises(ValueError):
      bad()
