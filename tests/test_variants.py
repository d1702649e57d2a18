"""LPA variants (SPEC §1): low-rank gradient, multi-layer, adaptive layer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpa_jax.models import get_model
from lpa_jax.models.staged import depth_below_logits
from experiments import registry
from lpa_jax.perturb.adaptive import AdaptiveState, lpa_adaptive
from lpa_jax.perturb.base import Batch, identity
from experiments.registry import Context
from lpa_jax.perturb.classes import ClassStats, class_radii, constant_split
from lpa_jax.perturb.hooks import Cut, cut_staged
from lpa_jax.perturb.lpa import lpa
from lpa_jax.perturb.pgd import class_pgd, lowrank_rows
from lpa_jax.perturb.place import place
from lpa_jax.perturb.tables import row_norms
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import StepConfig, make_train_step

C, B = 4, 8
X = jax.random.normal(jax.random.PRNGKey(1), (B, 8, 8, 3))
Y = jnp.arange(B) % C
BATCH = Batch(X, Y, jax.nn.one_hot(Y, C))
MODEL = get_model("cnn", C, widths=(4, 8, 8))
VARS = dict(MODEL.init(jax.random.PRNGKey(0), X[:1]))


def _ranks(t_CxHxWxD):
  c, h, w, d = t_CxHxWxD.shape
  return [np.linalg.matrix_rank(np.asarray(m), tol=1e-5 * float(jnp.abs(m).max()))
          for m in t_CxHxWxD.reshape(c, h * w, d)]


def _recording(cut: Cut, log: list) -> Cut:
  """The same cut, logging the inputs of every ``upper`` call in program order: the last one
  is the final, post-PGD pass."""
  def upper(variables, act, train, extra=None, **kw):
    jax.debug.callback(lambda a, e: log.append((a, e)), act, extra, ordered=True)
    return cut.upper(variables, act, train, extra, **kw)
  return cut._replace(upper=upper)


def _run_lpa(method):
  jax.jit(lambda v: method.apply(method.init(), BATCH.x, labels=BATCH.labels_B, variables=v,
                                rng=None, train=True, targets=BATCH.targets_BxC))(VARS)
  jax.effects_barrier()


def _lpa(ctx, point, extra_points=(), **kw):
  """LPA from hyper-parameters, placed at ``point`` (and jointly at ``extra_points``)."""
  cut = ctx.cut_fn(point)
  method = lpa(C, class_counts=ctx.class_counts, depth=ctx.depth(point),
               extra_points={p: ctx.depth(p) for p in extra_points}, **kw)
  return place(method, cut, registry._shape_of(ctx, extra_points) if extra_points else None)


def _adaptive(ctx, points, every, select="auto", **kw):
  cands = [(lpa(C, class_counts=ctx.class_counts, depth=ctx.depth(p), **kw),
            ctx.cut_fn(p)) for p in points]
  return lpa_adaptive(cands, every, select=select)


def _ctx(log=None, spe=1):
  cut_fn = (lambda p: _recording(cut_staged(MODEL, p), log)) if log is not None else \
      (lambda p: cut_staged(MODEL, p))
  return Context(C, np.full(C, 10), spe, 4, cut_fn, tuple(MODEL.points))


# --------------------------------------------------------------------------------- low-rank
def test_lowrank_rows_rank_at_most_k():
  g = jax.random.normal(jax.random.PRNGKey(0), (C, 4, 4, 16))  # HW = 16, D = 16 -> k = 4
  assert max(_ranks(lowrank_rows(g, 0.25))) <= 4
  assert min(_ranks(g)) == 16
  low = lowrank_rows(g, 0.25)
  np.testing.assert_allclose(lowrank_rows(low, 0.25), low, atol=1e-4)  # already rank k
  v = jax.random.normal(jax.random.PRNGKey(0), (C, 7))
  np.testing.assert_array_equal(lowrank_rows(v, 0.25), v)  # vectors: nothing to project


def test_lowrank_pgd_step_has_rank_k_per_class():
  target = jax.random.normal(jax.random.PRNGKey(2), (C, 4, 4, 16))
  loss_fn = lambda t: (jnp.sum((t["p"] - target) ** 2), None)
  zeros = {"p": jnp.zeros_like(target)}
  tables, _ = class_pgd(loss_fn, zeros, jnp.ones(C), jnp.ones(C), {"p": jnp.ones(C)}, 1,
                        lowrank=0.25)
  assert max(_ranks(tables["p"])) <= 4
  np.testing.assert_allclose(row_norms(tables["p"]), 1.0, rtol=1e-5)  # step 2ε/T, projected
  full, _ = class_pgd(loss_fn, zeros, jnp.ones(C), jnp.ones(C), {"p": jnp.ones(C)}, 1)
  assert min(_ranks(full["p"])) > 4


def test_lowrank_lpa_delta_has_rank_k():
  log = []
  _run_lpa(_lpa(_ctx(log), point="stage2", split="all_positive", eps=1.0, steps=1, lowrank=0.25))
  act = cut_staged(MODEL, "stage2").lower(VARS, X, True)[0]
  delta_BxHxWxD = log[-1][0] - act
  k = max(1, int(0.25 * min(4 * 4, 8)))  # stage2: 4x4x8
  assert max(_ranks(delta_BxHxWxD[:C])) <= k  # samples 0..C-1 cover every class once
  assert float(jnp.abs(delta_BxHxWxD).max()) > 0


# ------------------------------------------------------------------------------ multi-layer
def test_multilayer_each_point_within_its_own_radius():
  log = []
  eps, beta = 1.0, 0.5
  points = ("stage2", "stage3", "features")
  _run_lpa(_lpa(_ctx(log), point=points[0], extra_points=points[1:], split="all_positive",
               eps=eps, beta=beta, steps=3, varied=False))
  act = cut_staged(MODEL, points[0]).lower(VARS, X, True)[0]
  final_act, extra = log[-1]
  per_point = {points[0]: final_act - act, **extra}
  assert set(per_point) == set(points)
  split = constant_split(np.ones(C))
  seen = []
  for p in points:
    depth = depth_below_logits(MODEL.points, p)
    radius = float(class_radii(split, eps, 0.0, beta, depth, False)[0])
    assert radius == pytest.approx(beta ** depth * eps)
    norms = np.asarray(row_norms(per_point[p]))  # per sample = ‖δ_{y_i}‖ at that point
    assert np.all(norms <= radius * (1 + 1e-5)), (p, norms, radius)
    assert np.all(norms > 0.5 * radius), (p, norms, radius)
    seen.append(radius)
  assert len(set(seen)) == len(points)  # β^(L−l) differs point by point


# --------------------------------------------------------------------------------- adaptive
def _train(method, steps, spe, counter=None):
  tx = optax.sgd(0.05)
  params = VARS["params"]
  state = TrainState(jnp.zeros((), jnp.int32), params, {"batch_stats": VARS["batch_stats"]},
                     tx.init(params), method.init(), (),
                     jax.random.PRNGKey(3))
  inner = make_train_step(method, identity(), tx, StepConfig(spe, C))

  def counted(s, b):
    if counter is not None:
      counter.append(1)  # runs once per trace
    return inner(s, b)

  step = jax.jit(counted)
  img = jax.random.normal(jax.random.PRNGKey(4), X.shape)
  history = []
  for _ in range(steps):
    state, metrics = step(state, {"image": img, "label": Y})
    history.append(jax.device_get(metrics))
  return state, history, step


@pytest.mark.parametrize("select", ["switch", "mask"])
def test_adaptive_switches_to_dominant_candidate_compiling_once(select):
  # At the logits (depth 0) the radius is 2.0; at stage1 (depth 4) it is 2·0.05⁴: the logit
  # perturbation changes the loss far more, so the selection must land on it.  every=2 with 2
  # steps an epoch: epoch 0 trains, epoch 1 measures, epoch 2 (step 4) selects.
  counter = []
  method = _adaptive(_ctx(spe=2), ("stage1", "logits"), every=2, split="all_positive",
                        eps=2.0, beta=0.05, steps=2, select=select)
  state, hist, step = _train(method, 5, spe=2, counter=counter)
  assert len(counter) == 1 and step._cache_size() == 1  # no retrace across epoch boundaries
  assert [int(h["layer_index"]) for h in hist] == [0, 0, 0, 0, 1]
  assert [bool(h["layer_score_K"].any()) for h in hist] == [False, False, True, True, False]
  score = hist[3]["layer_score_K"]
  assert score[1] > 10 * score[0] > 0
  assert int(state.act_state.index) == 1 and int(state.step) == 5


def test_adaptive_refresh_selects_every_m_epochs():
  method = _adaptive(_ctx(), ("stage1", "stage2", "stage3"), every=3, split="balanced")
  s = method.init()._replace(score_sum_K=jnp.array([1.0, 5.0, 2.0]), score_n=jnp.array(2.0))
  stats = ClassStats.zeros(C)
  kept = method.refresh(s, stats, jnp.int32(4))
  assert int(kept.index) == 0 and float(kept.score_n) == 2.0 and not bool(kept.measure)
  assert bool(method.refresh(s, stats, jnp.int32(5)).measure)  # epoch 5 feeds the pick at 6
  picked = method.refresh(s, stats, jnp.int32(6))
  assert int(picked.index) == 1 and float(picked.score_n) == 0.0
  assert isinstance(picked, AdaptiveState)


def test_adaptive_rejects_unknown_candidate():
  with pytest.raises(ValueError, match="stage3"):
    _adaptive(_ctx(), ("stage9",), every=1)
