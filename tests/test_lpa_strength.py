"""LPA's strength set in nats (``radius_mode="loss"``, SPEC §1) and the logged class
sensitivity ``‖g_c‖`` (``aux['grad_norm_C']``), on a tiny MLP above the point."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import registry
from experiments.configs import methods
from experiments.registry import Context
from lpa_jax.models import get_model
from lpa_jax.perturb import classes
from lpa_jax.perturb.hooks import cut_staged
from lpa_jax.perturb.lpa import LossState, lpa

C, D, B = 4, 16, 64
SIGNS = [1, -1, 1, -1]
_k1, _k2, _k3 = jax.random.split(jax.random.key(0), 3)
W1 = jax.random.normal(_k1, (D, 32)) / np.sqrt(D)
W2 = jax.random.normal(_k2, (32, C)) / np.sqrt(32)
ACT = jax.random.normal(_k3, (B, D))
LABELS = jnp.arange(B) % C


def mlp_upper(sensitivity=1.0):
  """The layers above the point; ``sensitivity`` scales their gradient with respect to the
  activation (about linearly: the tanh stays near its linear range)."""
  return lambda a: 3.0 * jnp.tanh(0.03 * sensitivity * a @ W1) @ W2


def class_loss_change(upper, new_act, act=ACT, labels=LABELS):
  """Each class's mean perturbed − clean cross-entropy, computed here, not by LPA."""
  ce = lambda a: optax.softmax_cross_entropy_with_integer_labels(upper(a), labels)  # noqa: E731
  d, y = np.asarray(ce(new_act) - ce(act)), np.asarray(labels)
  return np.array([d[y == c].mean() if np.any(y == c) else np.nan for c in range(C)])


def jit_apply(method, upper):
  """``method.apply`` jitted for one ``upper``: ``(state, act, labels) -> Out``."""
  return jax.jit(lambda s, a, y: method.apply(s, a, labels=y, upper=upper))


def run(method, upper, steps, act=ACT, labels=LABELS):
  """``steps`` jitted LPA steps on one batch, the state threaded; the last output."""
  apply = jit_apply(method, upper)
  step = lambda s: apply(s, act, labels)  # noqa: E731
  state = method.init()
  for _ in range(steps):
    out = step(state)
    state = out.state
  return out


def test_loss_mode_holds_the_target_as_sensitivity_grows_tenfold():
  kw = dict(split="signs", signs=SIGNS, eps=0.2, varied=False)
  rel = lpa(C, radius_mode="relative", **kw)
  loss = lpa(C, radius_mode="loss", target=0.05, **kw)
  change, radius = {}, {}
  for s in (1.0, 10.0):
    change["rel", s] = np.abs(class_loss_change(mlp_upper(s), run(rel, mlp_upper(s), 1).x))
    out = run(loss, mlp_upper(s), 30)
    change["loss", s] = np.abs(class_loss_change(mlp_upper(s), out.x))
    radius[s] = np.asarray(out.aux["radius_C"])
  # A relative radius's loss change follows the sensitivity (~10x) ...
  assert np.all(change["rel", 10.0] > 6 * change["rel", 1.0])
  # ... the loss mode's stays at the target, because its radius shrank about tenfold.
  np.testing.assert_allclose(change["loss", 1.0], 0.05, rtol=0.05)
  np.testing.assert_allclose(change["loss", 10.0], 0.05, rtol=0.05)
  assert np.all((radius[10.0] < radius[1.0] / 5) & (radius[10.0] > radius[1.0] / 20))


def test_loss_mode_starts_at_the_relative_radius():
  kw = dict(split="longtail", class_counts=[50, 30, 10, 5], num_head=2, eps=0.2,
            delta_eps=0.3, beta=0.7, depth=2)
  rel, loss = lpa(C, radius_mode="relative", **kw), lpa(C, radius_mode="loss", target=1.0, **kw)
  r_C = classes.class_radii(rel.init().split, 0.2, 0.3, 0.7, 2, True)
  np.testing.assert_allclose(np.exp(loss.init().log_radius_C), r_C, rtol=1e-6)
  a, b = (jit_apply(m, mlp_upper())(m.init(), ACT, LABELS) for m in (rel, loss))
  np.testing.assert_allclose(a.x, b.x, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(a.aux["radius_C"], b.aux["radius_C"], rtol=1e-6)


def test_a_varied_target_grows_with_the_distance_from_the_threshold():
  m = lpa(C, split="longtail", class_counts=[50, 30, 10, 5], num_head=2, eps=0.2,
          radius_mode="loss", target=0.03, target_delta=0.04)
  split = m.init().split
  lam_C = 0.03 + 0.04 * np.abs(np.asarray(split.tau - split.q_C))
  assert len(set(np.round(lam_C, 6))) == 2  # two distances from τ in this split
  out = run(m, mlp_upper(3.0), 40)
  np.testing.assert_allclose(np.abs(class_loss_change(mlp_upper(3.0), out.x)), lam_C,
                             rtol=0.05)


def test_radius_stays_within_its_bounds():
  kw = dict(split="signs", signs=SIGNS, eps=0.2, varied=False, radius_mode="loss",
            eps_min=0.05, eps_max=0.5)
  norm_C = np.array([np.linalg.norm(ACT[np.asarray(LABELS) == c], axis=1).mean()
                     for c in range(C)])
  for target, bound in ((100.0, 0.5), (1e-9, 0.05)):  # out of reach either way
    out = run(lpa(C, target=target, **kw), mlp_upper(), 40)
    np.testing.assert_allclose(np.exp(out.state.log_radius_C), bound, rtol=1e-5)
    np.testing.assert_allclose(out.aux["radius_C"], bound * norm_C, rtol=1e-5)
  # an initial radius outside the bounds starts clipped
  np.testing.assert_allclose(np.exp(lpa(C, target=1.0, **{**kw, "eps": 2.0}).init()
                                    .log_radius_C), 0.5, rtol=1e-6)


def test_absent_unsigned_and_insensitive_classes_keep_their_radius():
  m = lpa(C, split="signs", signs=[1, -1, 0, 1], eps=0.2, varied=False, radius_mode="loss",
          target=0.05)
  labels = jnp.arange(B) % 3  # class 3 (signed) is absent, class 2 is unsigned
  s0 = m.init()
  out = jit_apply(m, mlp_upper())(s0, ACT, labels)
  moved = np.asarray(out.state.log_radius_C) != np.asarray(s0.log_radius_C)
  assert moved.tolist() == [True, True, False, False]
  # above a batch-coupled layer (like a train-mode BatchNorm) the unsigned class's loss moves
  # too, through the others' δ; still it has no direction to hold a strength in
  coupled = lambda a: mlp_upper(5.0)(a - a.mean(0))  # noqa: E731
  out = jit_apply(m, coupled)(s0, ACT, labels)
  assert abs(class_loss_change(coupled, out.x, labels=labels)[2]) > 1e-4
  assert out.state.log_radius_C[2] == s0.log_radius_C[2]
  # an upper that ignores the activation: |Δℓ_c| = 0 has no log, so nothing moves (no NaN)
  flat = jit_apply(m, lambda a: 0.0 * a[:, :C])(s0, ACT, LABELS)
  np.testing.assert_array_equal(flat.state.log_radius_C, s0.log_radius_C)


def test_loss_state_round_trips_under_jit_vmap_and_refresh():
  m = lpa(C, split="balanced", eps=0.2, radius_mode="loss", target=0.05)
  state = m.init()
  assert isinstance(state, LossState) and state.log_radius_C.shape == (C,)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(classes.split_state(
      state.split))) + 1  # the radii are one more array leaf, nothing else
  same = jax.jit(lambda s: s)(state)
  assert isinstance(same, LossState)
  chex.assert_trees_all_equal(same, state)
  # after a refresh the balanced split gives directions and the radii survive it
  stepped = jit_apply(m, mlp_upper())(state, ACT, LABELS).state
  state = jax.jit(m.refresh)(stepped)
  assert isinstance(state, LossState) and np.all(np.asarray(state.sign_C) != 0)
  np.testing.assert_array_equal(state.log_radius_C, stepped.log_radius_C)
  eager = m.apply(state, ACT, labels=LABELS, upper=mlp_upper()).state
  jitted = jit_apply(m, mlp_upper())(state, ACT, LABELS)
  chex.assert_trees_all_close(eager, jitted.state, rtol=1e-6)
  assert not np.allclose(eager.log_radius_C, state.log_radius_C)  # the step adapted them
  # a stack of states (e.g. K runs) goes through vmap
  stack = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  vm = jax.vmap(lambda s: m.apply(s, ACT, labels=LABELS, upper=mlp_upper()).state)(stack)
  np.testing.assert_allclose(vm.log_radius_C[1], eager.log_radius_C, rtol=1e-6)


def test_grad_norm_is_the_class_mean_gradient_at_zero():
  labels = jnp.array([0, 0, 1, 0, 1, 1, 1, 0] * 4)  # classes 2, 3 absent
  act = ACT[:32]
  upper = mlp_upper(5.0)
  m = lpa(C, split="signs", signs=SIGNS, eps=0.5, lowrank=0.5, radius_mode="relative")
  got = np.asarray(jit_apply(m, upper)(m.init(), act, labels).aux["grad_norm_C"])

  def class_loss(shift_D, c):  # Σ_{i∈S_c} ℓ_i with a_i + shift
    onehot = (labels == c).astype(jnp.float32)[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(upper(act + onehot * shift_D), labels)
    return jnp.sum(ce * onehot[:, 0])

  for c in range(C):
    n_c = int(np.sum(np.asarray(labels) == c))
    g = jax.grad(class_loss)(jnp.zeros(D), c) / max(n_c, 1)
    np.testing.assert_allclose(got[c], np.linalg.norm(g), rtol=1e-5, atol=1e-8)
  assert got[0] > 0 and got[1] > 0 and got[2] == 0 and got[3] == 0


BAD = [
    (dict(radius_mode="loss"), r"radius_mode='loss' needs lpa\.target"),
    (dict(radius_mode="relative", target=0.1), r"target=0\.1 only apply with radius_mode='loss'"),
    (dict(radius_mode="absolute", eta=0.2), r"eta=0\.2 only apply with radius_mode='loss'"),
    (dict(radius_mode="loss", target=0.0), r"target > 0"),
    (dict(radius_mode="loss", target=-1.0), r"target > 0"),
    (dict(radius_mode="loss", target=float("nan")), r"lpa\.target must be finite"),
    (dict(radius_mode="loss", target=float("inf")), r"lpa\.target must be finite"),
    (dict(radius_mode="loss", target=0.1, target_delta=-0.1), r"target_delta >= 0"),
    (dict(radius_mode="loss", target=0.1, eta=0.0), r"lpa\.eta .* must lie in \(0, 1\]"),
    (dict(radius_mode="loss", target=0.1, eta=1.5), r"lpa\.eta .* must lie in \(0, 1\]"),
    (dict(radius_mode="loss", target=0.1, eps_min=0.0), r"0 < eps_min <= eps_max"),
    (dict(radius_mode="loss", target=0.1, eps_min=0.5, eps_max=0.1), r"eps_min=0\.5, eps_max"),
    (dict(radius_mode="loss", target=0.1, eps_max=float("inf")), r"lpa\.eps_max must be finite"),
    (dict(radius_mode="loss", target=0.1, eps=0.0), r"lpa\.eps must be > 0 with radius_mode"),
    (dict(radius_mode="loss", target=0.1, extra_points={"hidden2": 1}), r"drop extra_points"),
    (dict(radius_mode="nats"), r"lpa\.radius_mode must be one of .*'loss'"),
]


@pytest.mark.parametrize("kw,match", BAD)
def test_bad_loss_mode_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    lpa(C, split="all_positive", **kw)


def test_the_config_block_reaches_lpa():
  model = get_model("mlp", C, widths=(16, 8))
  ctx = Context(C, np.array([50, 30, 10, 5]), 5, 4, functools.partial(cut_staged, model),
                tuple(model.points))
  pc = methods.method_blocks("longtail")["lpa"]
  assert pc.radius_mode == "relative" and pc.target is None  # off by default
  assert not isinstance(registry.entry("lpa").build(pc, ctx).init(), LossState)
  pc.update(dict(radius_mode="loss", target=0.1, eta=0.3, eps_min=0.01, eps_max=0.5))
  state = registry.entry("lpa").build(pc, ctx).init()
  assert isinstance(state, LossState)
  assert np.all(np.exp(np.asarray(state.log_radius_C)) >= 0.01 - 1e-7)
  pc.eta = 2.0
  with pytest.raises(ValueError, match=r"lpa\.eta"):
    registry.entry("lpa").build(pc, ctx)


def test_a_loss_mode_run_logs_radii_and_sensitivity_and_resumes_exactly(tmp_path, fmnist_lt):
  import json
  import os

  from conftest import small_config
  from experiments.train import loop
  cfg = small_config(**{"perturb.activation": "lpa", "perturb.lpa.radius_mode": "loss",
                        "perturb.lpa.target": 0.1, "optim.batch_size": 32})
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), progress=False, data=fmnist_lt)
  part = str(tmp_path / "part")
  # stopped mid-epoch: the adapted radii must come back from the checkpoint, not from init
  assert loop.train_and_evaluate(cfg, part, progress=False, max_steps=3, data=fmnist_lt) is None
  resumed = loop.train_and_evaluate(cfg, part, progress=False, data=fmnist_lt)
  assert resumed["per_class_accuracy"] == full["per_class_accuracy"]
  rows = [json.loads(x) for x in open(os.path.join(part, "metrics.jsonl"))]
  assert rows == [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
  for r in rows:
    assert len(r["radius_C"]) == len(r["grad_norm_C"]) == 10
    assert all(g > 0 for g in r["grad_norm_C"])
  # the radii moved from the starting relative radius towards the target's
  assert rows[-1]["radius_C"] != rows[0]["radius_C"]
