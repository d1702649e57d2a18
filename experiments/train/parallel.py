"""K runs as one program: the seeds of one config trained by one vmapped, jitted step.

Each run keeps its own parameters, optimiser state, class statistics, rng and batch order (its
own epoch permutation and data keys), and its own work dir, written as a separate run writes it
(``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``results.json``, ``tensorboard/``): a
run started here can be continued alone by :func:`experiments.train.loop.train_and_evaluate`, and
the other way round.  The K runs share one compile and advance together, so they are always
checkpointed at the same steps.

Resume: each run restores its newest usable checkpoint.  If those steps differ (a kill between
two runs' saves, a corrupt checkpoint that fell back to an older one, a run continued alone),
the runs behind are first brought up to the furthest one as separate runs, then the group
continues as one program.  Either way every run's result is that of a separate run.  Not run
as a doctest: it trains, on the data.

  >>> res = train_and_evaluate_parallel([c0, c1, c2], ["r/s0", "r/s1", "r/s2"])  # doctest: +SKIP
"""

import contextlib
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import data as lpa_data
from experiments.data.pipeline import dataset_stats, prepare_batch
from experiments.train import loop
from experiments.train.build import (build_methods, build_model, build_optimizer, build_run,
                                 init_state, make_epoch_perm)
from experiments.train.lock import hold
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import (StepConfig, jit_parallel_train_step, make_mesh, make_train_step,
                                step_keys)
from experiments.train.workdir import claim, config_diff

# Fields with a leading run axis in a K-run state; the step is shared.
_MAPPED = tuple(f.name for f in dataclasses.fields(TrainState) if f.name != "step")


def check_group(configs) -> None:
  """Refuses configs that differ in anything but ``seed``: one program trains them all with
  run 0's methods and optimiser, so only what enters through the initial state may differ."""
  for k, c in enumerate(configs[1:], 1):
    other = [f"{f}: {a!r} vs {b!r}" for f, a, b in config_diff(configs[0], c) if f != "seed"]
    if other:
      raise ValueError(f"Parallel runs must differ only by seed; run {k} differs from run 0 "
                       f"in:\n  " + "\n  ".join(other[:12]))


def stack_states(states, mesh) -> TrainState:
  """K single-run states (same step) -> one K-run state, replicated over ``mesh``.

  >>> s0 = TrainState(step=jnp.int32(0), params={"Dense_0": {"kernel": jnp.ones((4, 8))}},
  ...                 model_state={}, opt_state=(), act_state=(), logit_state=(),
  ...                 rng=jax.random.PRNGKey(0))
  >>> s1, s2 = s0.replace(rng=jax.random.PRNGKey(1)), s0.replace(rng=jax.random.PRNGKey(2))
  >>> stack_states([s0, s1, s2], make_mesh()).params["Dense_0"]["kernel"].shape
  (3, 4, 8)
  """
  fields = {name: jax.tree.map(lambda *xs: jnp.stack(xs), *[getattr(s, name) for s in states])
            for name in _MAPPED}
  return jax.device_put(TrainState(step=states[0].step, **fields), NamedSharding(mesh, P()))


def unstack_state(state_K: TrainState, k: int) -> TrainState:
  """Run ``k`` of a K-run state, shaped as a separate run's state (same checkpoint layout).

  >>> s0 = TrainState(step=jnp.int32(5), params={"w": jnp.zeros(2)}, model_state={},
  ...                 opt_state=(), act_state=(), logit_state=(), rng=jax.random.PRNGKey(0))
  >>> state_K = stack_states([s0, s0.replace(params={"w": jnp.ones(2)})], make_mesh())
  >>> run1 = unstack_state(state_K, 1)
  >>> int(run1.step), run1.params["w"].tolist()
  (5, [1.0, 1.0])
  """
  fields = {name: jax.tree.map(lambda x: x[k], getattr(state_K, name)) for name in _MAPPED}
  return TrainState(step=state_K.step, **fields)


def make_parallel_batch_fn(config, data, mesh, spe: int) -> Callable:
  """``(state_K, epoch, i, perm_KxSxB) -> batch_K``: each run's step ``epoch * spe + i`` batch
  from its own permutation and data key, as :func:`~experiments.train.build.make_batch_fn` makes
  it for a separate run; ``[K, B, ...]``, sharded over ``'data'`` along B.  Not run as a
  doctest: it needs a loaded ``data``.

  >>> batch_fn = make_parallel_batch_fn(config, data, mesh, 7)             # doctest: +SKIP
  >>> batch_K = batch_fn(state_K, 0, 0, perm_K)                           # doctest: +SKIP
  """
  rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  mean, std = (tuple(s) for s in dataset_stats(config.data.name))
  augment = config.train.augment

  def one(x, y, idx_B, rng, step):
    r_data, _ = step_keys(rng, step)
    return prepare_batch(r_data, x[idx_B], y[idx_B], augment, mean, std)
  gather = jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, None)), out_shardings=sharded)
  x_train = jax.device_put(data.x_train, rep)
  y_train = jax.device_put(np.asarray(data.y_train, np.int32), rep)

  def batch_fn(state_K: TrainState, epoch: int, i: int, perm_KxSxB):
    return gather(x_train, y_train, perm_KxSxB[:, i], state_K.rng, epoch * spe + i)
  return batch_fn


def build_parallel(configs, data, mesh) -> loop.Group:
  """The :class:`~experiments.train.loop.Group` of K runs of one config (differing only by seed)
  trained as one program: one vmapped step, every state field but the step with a leading
  run axis (:func:`stack_states`), each run's batches from its own permutation and data key.
  Not run as a doctest: it needs a loaded ``data``.

  >>> group = build_parallel([cfg0, cfg1], data, make_mesh())              # doctest: +SKIP
  >>> state_K = group.stack(group.init_states)                            # doctest: +SKIP
  """
  check_group(configs)
  run = build_run(configs[0], data, mesh)
  spe = run.steps_per_epoch
  model, cut_fn = build_model(configs[0], data.num_classes)
  states, step_fn = [], None
  for c in configs:  # each run's own initial state: parameters, rng, optimiser state
    methods = build_methods(c, data, cut_fn, model.points, spe)
    _, tx = build_optimizer(c, spe, methods.grad)
    states.append(init_state(c, model, data.x_train.shape[1:], tx, methods, data.num_classes,
                             mesh))
    if step_fn is None:
      step_fn = make_train_step(methods.act, methods.logit, tx, StepConfig(spe, data.num_classes))
  perms = [make_epoch_perm(c, data.num_train) for c in configs]
  return loop.Group(run=run, train_step=jit_parallel_train_step(step_fn, mesh),
                    init_states=tuple(states),
                    batch_fn=make_parallel_batch_fn(configs[0], data, mesh, spe),
                    epoch_perm=lambda epoch: jnp.stack([p(epoch) for p in perms]),
                    stack=lambda states_K: stack_states(states_K, mesh), state_of=unstack_state,
                    metrics_of=lambda host, k: {name: v[k] for name, v in host.items()})


def _catch_up(configs, workdirs, steps, data, mesh) -> None:
  """Brings the runs behind the furthest one up to its step, each as a separate run."""
  target = max(steps)
  for config, workdir, step in zip(configs, workdirs, steps):
    if step < target:
      loop.train_and_evaluate(config, workdir, progress=False, max_steps=target - step,
                              data=data, mesh=mesh)


def train_and_evaluate_parallel(configs, workdirs, progress: bool = True,
                                max_steps: int | None = None, data=None, mesh=None,
                                fresh=False) -> list[dict] | None:
  """Trains K configs that differ only by seed as one program, each run in its own work dir
  (resuming each from its checkpoint), and writes each run's ``results.json``; returns the
  K results dicts, or ``None`` when ``max_steps`` stopped this invocation first.

  Arguments are those of :func:`experiments.train.loop.train_and_evaluate`, one config and work
  dir per run; ``fresh`` is one bool or one per run.  Each ``results.json`` records the run's
  share of the group's wall time and ``parallel: {runs, group_wall_time_s}``.  Not run as a
  doctest: it trains, on the data.

  >>> res = train_and_evaluate_parallel([c0, c1], ["runs/s0", "runs/s1"])   # doctest: +SKIP
  >>> [r["test_accuracy"] for r in res]                                     # doctest: +SKIP
  [0.71, 0.70]
  """
  t0, n_runs = time.time(), len(configs)
  if len(workdirs) != n_runs or len(set(map(os.path.abspath, workdirs))) != n_runs:
    raise ValueError(f"Give one distinct work dir per config; got {list(workdirs)}")
  data = data if data is not None else lpa_data.load_task_data(configs[0].data)
  mesh = mesh if mesh is not None else make_mesh()
  group = build_parallel(configs, data, mesh)
  fresh_K = list(fresh) if isinstance(fresh, (list, tuple)) else [fresh] * n_runs
  with contextlib.ExitStack() as locks:
    for config, workdir, f in zip(configs, workdirs, fresh_K):
      locks.enter_context(hold(workdir))
      claim(workdir, config, f)
    resumed = _resume(group, configs, workdirs, data, mesh)
    return loop.train_resumed(group, configs, workdirs, data, resumed, progress, max_steps, t0)


def _resume(group: loop.Group, configs, workdirs, data, mesh) -> list[tuple]:
  """Each run resumed from its own checkpoint; runs behind the furthest are first brought up
  to its step one by one (an interrupted group saves them all at one step, but a run may have
  been continued alone)."""
  resumed = loop.resume_group(group, workdirs)
  steps = [int(jax.device_get(state.step)) for _, state, *_ in resumed]
  if len(set(steps)) > 1:
    _catch_up(configs, workdirs, steps, data, mesh)
    for mgr, *_ in resumed:  # a manager caches its steps: read those the catch-up wrote afresh
      mgr.close()
    resumed = loop.resume_group(group, workdirs)
  return resumed
