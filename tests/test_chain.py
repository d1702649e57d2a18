"""Logit methods from hyper-parameters alone, composed with ``chain`` (issue 19 §1), on the one
protocol: ``apply(state, x, *, labels, targets, step, clean_logits) -> Out``.

Everything a user needs comes from ``lpa_jax.perturb``: no run ``Context``, no registry (the
config's SAM, clipping and gradient noise come from the application, ``experiments``)."""
import math
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.gradients import clip, grad_noise, sam
from lpa_jax.perturb import (Out, chain, cut_linen, gaf, identity, ldam, logit_adjust, lpa, lpg,
                             lpl, noise, perturbed_apply)
from lpa_jax.perturb.base import pgd_loss_of
from lpa_jax.perturb.logit import drw_start

C, B = 4, 16
COUNTS = np.array([40, 20, 10, 5])
Z = jax.random.normal(jax.random.key(0), (B, C))
Y = jnp.arange(B) % C
T = jax.nn.one_hot(Y, C)


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
  return lpg(C, split="longtail", class_counts=COUNTS, eps=0.3, varied=False)


def _run(m, z=Z, step=0) -> Out:
  return m.apply(m.init(), z, labels=Y, targets=T, step=step)


def _ce(z, targets=T):
  return optax.softmax_cross_entropy(z, targets).mean()


# ----------------------------------------------------------------------------- composition

def test_lpa_then_la_and_lpl_compose_without_a_context():
  """LPA's PGD follows the chained LA + LPL loss, and the chain applies LA then LPL: one
  ``perturbed_apply(chain(lpa, la, lpl))`` gives the numbers of that composition by hand."""
  x = jax.random.normal(jax.random.key(1), (B, 6))
  model = Net()
  variables = model.init(jax.random.key(2), x)
  cut = cut_linen(model, "hidden", input_shape=(6,))
  la, lp = _la(), _lpl()
  logit = chain(la, lp)
  method = lpa(C, split="longtail", class_counts=COUNTS, eps=0.5, varied=False)
  # By hand: LPA with PGD on the chained loss, then LA and LPL on its logits.
  loss_fn = pgd_loss_of(logit, logit.init(), Y, T, 0)
  out = perturbed_apply(method, cut, method.init(), variables, x, Y, loss_fn=loss_fn)
  lout = logit.apply(logit.init(), out.x, labels=Y, targets=T, step=0,
                     clean_logits=out.clean_logits)
  z, w_B, aux = lout.x, lout.weights_B, lout.aux
  kw = dict(labels=Y, targets=T, step=0)
  by_hand = lp.apply(lp.init(), la.apply(la.init(), out.logits_BxC, **kw).x, **kw).x
  np.testing.assert_array_equal(z, by_hand)
  np.testing.assert_array_equal(w_B, 1.0)
  assert set(aux) == {"lpl_delta_norm_C", "lpl_steps_C"}

  def by_hand_loss(logits, targets):  # w_B · CE(LPL(LA(z)))
    kw = dict(labels=Y, targets=targets, step=0)
    zz = lp.apply(lp.init(), la.apply((), logits, **kw).x, **kw).x
    return optax.softmax_cross_entropy(zz, targets)
  ref = perturbed_apply(method, cut, method.init(), variables, x, Y, loss_fn=by_hand_loss)
  np.testing.assert_allclose(out.logits_BxC, ref.logits_BxC, rtol=1e-6, atol=1e-6)
  plain = perturbed_apply(method, cut, method.init(), variables, x, Y)  # cross-entropy PGD
  assert float(jnp.abs(out.logits_BxC - plain.logits_BxC).max()) > 1e-4

  # The chain in one call: PGD on the members' loss, LA then LPL, the loss on their logits.
  perturb = chain(method, la, lp)
  full = perturbed_apply(perturb, cut, perturb.init(), variables, x, Y)
  np.testing.assert_allclose(full.x, z, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(full.loss, _ce(z), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(full.weights_B, 1.0)
  np.testing.assert_allclose(full.clean_logits, out.clean_logits, rtol=1e-6, atol=1e-6)
  assert len(full.state) == 3 and full.state[1] == ()
  for got, want in ((full.state[0], out.state), (full.state[1:], lout.state)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
  assert {"lpl_delta_norm_C", "lpl_steps_C", "delta_norm_C"} <= set(full.aux)
  assert float(jnp.abs(full.x - logit.apply(logit.init(), plain.x, **kw).x).max()) > 1e-4


def test_la_lpl_lpg_chain_in_order_with_lpg_on_the_gradient_only():
  la, lp, g = _la(), _lpl(), _lpg()
  three, two = chain(la, lp, g), chain(la, lp)
  assert len(three.init()) == 3
  out3 = _run(three)
  z3, w3, aux3 = out3.x, out3.weights_B, out3.aux
  np.testing.assert_array_equal(z3, _run(two).x)              # LPG keeps the forward
  assert set(aux3) == {"lpl_delta_norm_C", "lpl_steps_C", "lpg_radius_C"}
  np.testing.assert_array_equal(w3, 1.0)

  def grad(f):
    return jax.jit(jax.grad(lambda z: _ce(f(z))))(Z)
  got = grad(lambda z: _run(three, z).x)
  want = grad(lambda z: g.apply(g.init(), _run(two, z).x, labels=Y, targets=T, step=0).x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(got - grad(lambda z: _run(two, z).x)).max()) > 1e-4
  # PGD follows the training loss, which LPG leaves alone.
  np.testing.assert_array_equal(pgd_loss_of(three, three.init(), Y, T, 0)(Z, T),
                                pgd_loss_of(two, two.init(), Y, T, 0)(Z, T))
  state = three.refresh(three.init(), None, 1)
  assert len(state) == 3


def test_class_level_logit_methods_keep_their_own_statistics_and_refresh_from_them():
  """LPL (balanced split) starts with no direction, gathers the batch's statistics from the
  clean logits a chain was given, and re-splits from them at refresh: below-mean classes
  expansive."""
  lp = lpl(C, split="balanced", alpha=0.1, steps=2)
  m = chain(_la(), lp)
  out = m.apply(m.init(), Z, labels=Y, targets=T, step=0)
  own = out.state[1]
  np.testing.assert_array_equal(own.sign_C, 0.0)                       # no split yet
  np.testing.assert_array_equal(own.stats.count_C, np.asarray(T.sum(0)))
  prob_C = np.asarray((jax.nn.softmax(Z) * T).sum(-1) @ T)
  np.testing.assert_allclose(own.stats.prob_sum_C, prob_C, rtol=1e-5)  # Z, not LA's output
  new = m.refresh(out.state)
  q_C = prob_C / np.maximum(np.asarray(T.sum(0)), 1)
  seen = np.asarray(T.sum(0)) > 0
  want = np.where(seen, np.where(q_C < q_C[seen].mean(), 1.0, -1.0), 0.0)
  np.testing.assert_array_equal(new[1].sign_C, want)
  np.testing.assert_array_equal(new[1].stats.count_C, 0.0)              # a fresh epoch


def test_chain_order_matters_where_it_should():
  la, lp = _la(), _lpl()
  la_then_lpl, lpl_then_la = _run(chain(la, lp)).x, _run(chain(lp, la)).x
  assert float(jnp.abs(la_then_lpl - lpl_then_la).max()) > 1e-3  # LPL's δ sees LA's shift
  half = logit_adjust(COUNTS[::-1], tau=0.5)
  np.testing.assert_allclose(_run(chain(la, half)).x, _run(chain(half, la)).x, rtol=1e-6)


def test_predict_weights_and_nesting():
  ph, ph2 = logit_adjust(COUNTS, mode="posthoc"), logit_adjust(COUNTS[::-1], mode="posthoc")
  m = chain(ph, ph2)
  prior = np.log(COUNTS / COUNTS.sum())
  np.testing.assert_allclose(m.predict(m.init(), Z), Z - prior - prior[::-1], rtol=1e-5,
                             atol=1e-6)
  drw = ldam(COUNTS, normalized_head=True, drw_start_step=0, batch_normalize=False)
  w_ldam, w_lpg = _run(drw).weights_B, _run(_lpg()).weights_B
  np.testing.assert_array_equal(_run(chain(drw, _la(), _lpg())).weights_B, w_ldam * w_lpg)
  assert not np.allclose(w_ldam, 1.0)
  flat, nested = chain(_la(), _lpl(), _lpg()), chain(chain(_la(), _lpl()), _lpg())
  assert jax.tree.structure(nested.init()) != jax.tree.structure(flat.init())
  np.testing.assert_array_equal(_run(nested).x, _run(flat).x)


def test_chain_of_none_or_one_is_that_method():
  lp = _lpl()
  assert chain(lp) is lp
  out = _run(chain())
  z, aux = out.x, out.aux
  np.testing.assert_array_equal(z, Z)
  assert chain().init() == identity().init() == () and aux == {}
  assert chain().info.get("identity") and chain().level == "logit"


def test_chain_refuses_clashing_aux_and_gradient_methods():
  twice = chain(_lpl(), lpl(C, split="all_positive", alpha=0.1))
  with pytest.raises(ValueError, match="members 0 and 1 both report aux 'lpl_delta_norm_C'"):
    _run(twice)
  with pytest.raises(TypeError, match=r"argument 1 is an optax gradient transformation: "
                                      r"gradient methods go into the optimiser"):
    chain(_la(), gaf())
  np.testing.assert_array_equal(_run(chain(_la(), lpg(C))).x, _run(_la()).x)


def test_chain_refuses_two_activation_members_and_one_after_a_logit_member():
  act = lpa(C, split="all_positive", eps=0.1)
  with pytest.raises(ValueError, match=r"members \[0, 1\] are all activation-level: one "
                                       r"activation method per chain"):
    chain(act, noise(0.1), _la())
  with pytest.raises(ValueError, match=r"the activation-level member 1 comes after logit member "
                                       r"0; put it first"):
    chain(_la(), act)
  with pytest.raises(TypeError, match=r"argument 1 is a tuple, not a Perturbation"):
    chain(_la(), (1, 2))
  mixed = chain(act, _la())                   # runs inside the network, not through apply
  assert mixed.level == "chain" and len(mixed.init()) == 2
  with pytest.raises(TypeError, match=r"call perturbed_apply\(chain, cut"):
    mixed.apply(mixed.init(), Z, labels=Y)


def test_the_readme_la_lpl_step_trains_on_the_chained_loss():
  """The README's ``logit-chain`` block in its ``step`` block, run on a tiny 10-class model:
  the step's loss is that of LPA (PGD on the LA + LPL loss) then LA and LPL by hand."""
  import lpa_jax as lj
  from flax.training import train_state
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  blocks = dict(re.findall(r"```python readme-test:([\w-]+)\n(.*?)```", text, flags=re.S))

  class TrainState(train_state.TrainState):   # as the README's setup block declares it
    model_state: dict
    pstate: Any = None

  class Net10(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(8, name="block2")(x)))
  x, y = jax.random.normal(jax.random.key(3), (20, 6)), jnp.arange(20) % 10
  counts = np.array([100, 60, 40, 30, 20, 10, 8, 6, 4, 2])
  variables = dict(Net10().init(jax.random.key(4), x))
  params = variables.pop("params")
  ns = dict(jax=jax, jnp=jnp, optax=optax, lj=lj, counts=counts,
            cut=lj.cut_linen(Net10(), "block2", input_shape=(6,)))
  for name in ("logit-chain", "step"):
    exec(compile(blocks[name], f"README.md[{name}]", "exec"), ns)  # noqa: S102
  perturb = ns["perturb"]
  state = TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                            model_state=variables, pstate=perturb.init())
  new, loss = ns["train_step"](state, x, y)
  # By hand: LPA alone with PGD on the chained loss, then LA and LPL on its logits.
  method, logit = perturb.members[0], chain(*perturb.members[1:])
  targets = jax.nn.one_hot(y, 10)
  out = perturbed_apply(method, ns["cut"], method.init(), {"params": state.params}, x, y,
                        loss_fn=pgd_loss_of(logit, logit.init(), y, targets, 0))
  want = _ce(logit.apply(logit.init(), out.logits_BxC, labels=y, targets=targets, step=0).x,
             targets)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert abs(float(want) - float(_ce(out.logits_BxC, targets))) > 1e-3   # LA + LPL acted
  assert int(new.step) == 1
  # LPL's state gathered the batch's class statistics from the clean logits (before LPA's δ
  # and LA's shift); LA keeps no state.
  lstate = new.pstate[1:]
  stats = lstate[1].stats
  np.testing.assert_array_equal(stats.count_C, np.bincount(np.asarray(y), minlength=10))
  prob = jnp.sum(jax.nn.softmax(out.clean_logits) * targets, -1)
  np.testing.assert_allclose(stats.prob_sum_C, prob @ targets, rtol=1e-5)
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
    (lambda: lpg(C, delta_eps=math.nan), r"lpg.delta_eps must be finite"),
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
      z = logit.apply(logit.init(), z, labels=y, targets=jax.nn.one_hot(y, C), step=0).x
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
