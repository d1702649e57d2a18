"""Small build functions: config (+ data, mesh) in, the pieces a training run needs out.

Each function builds one thing; :func:`build_run` chains them for the loop, and
:func:`build_train_step` gives just ``(jitted_step, initial_state, batch_fn)`` for a
benchmark or a notebook that drives the step itself.

  >>> import ml_collections as mlc
  >>> from experiments.configs import longtail
  >>> from experiments.data import TaskData
  >>> from lpa_jax.train.step import make_mesh
  >>> config = longtail.get_config("quick")
  >>> config.model.update(name="mlp", kwargs=mlc.ConfigDict(dict(widths=(8,))))
  >>> config.optim.batch_size = 8
  >>> y, images = np.arange(32) % 10, np.zeros((32, 28, 28, 1), np.uint8)   # a stand-in task
  >>> data = TaskData("tiny", images, y, images[:8], y[:8], 10, list("0123456789"))
  >>> step, state, batch_fn = build_train_step(config, data, make_mesh())
  >>> state, metrics = step(state, batch_fn(state, epoch=0, i=0))
  >>> int(state.step), sorted(metrics)
  (1, ['accuracy', 'grad_norm', 'invalid_labels', 'loss'])
"""

import contextlib
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs.common import InvalidConfig
from experiments.data.task import check_finite_inputs
from experiments.data.pipeline import dataset_stats, epoch_permutation, normalize, prepare_batch
from lpa_jax.models import get_model
from experiments import registry
from experiments.registry import Context
from lpa_jax.perturb.base import chain
from lpa_jax.perturb.hooks import cut_staged
from experiments.train import distributed
from experiments.train.schedules import make_optimizer, make_schedule
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import (StepConfig, jit_train_step, make_eval_step, make_train_step,
                                step_keys)


class Methods(NamedTuple):
  """The run's perturbation methods, one per level (see :mod:`experiments.registry`)."""
  act: object       # the activation method, placed in the network (network level)
  logit: object     # the logit perturbation (LPG's logit hook already chained in)
  grad: object      # registry.GradientPlacement (optax transforms and where they go)


class Run(NamedTuple):
  """Everything :func:`experiments.train.loop.train_and_evaluate` drives; plain data, no methods."""
  train_step: Callable      # jitted (state, batch) -> (state, metrics)
  init_state: TrainState
  batch_fn: Callable        # (state, epoch, i, perm=None) -> batch
  epoch_perm: Callable      # epoch -> int32 [steps_per_epoch, batch_size]
  predict: Callable         # (state, uint8 images) -> int predictions
  schedule: optax.Schedule
  steps_per_epoch: int
  mesh: object
  data: object              # the TaskData trained and evaluated on
  perturbation: tuple = ("none", None)  # (activation method, point), named in error messages
  clip_norm: float | None = None  # gradient clipping's max norm: the loop counts clipped steps


def steps_per_epoch(config, num_train: int, mesh) -> int:
  """Full batches per epoch, after checking the batch fits the data and the devices.

  >>> from experiments.configs import longtail
  >>> from lpa_jax.train.step import make_mesh
  >>> config = longtail.get_config("quick")                      # batch size 128
  >>> steps_per_epoch(config, num_train=1000, mesh=make_mesh())
  7
  """
  bs, n_dev = config.optim.batch_size, mesh.devices.size
  if bs % n_dev:
    raise InvalidConfig(f"Invalid config value config.optim.batch_size={bs}: must be divisible "
                        f"by the number of devices ({n_dev})")
  if num_train < bs:
    raise InvalidConfig(f"Invalid config value config.optim.batch_size={bs}: exceeds the "
                        f"{num_train} training examples")
  return num_train // bs


@contextlib.contextmanager
def config_errors(where: str):
  """Turns the ``ValueError`` a factory raises about a config's values (the library's, which
  name the argument but not the config field it came from) into
  :class:`~experiments.configs.common.InvalidConfig` naming ``where``: the entry points show
  it as one line."""
  try:
    yield
  except InvalidConfig:
    raise
  except ValueError as e:
    raise InvalidConfig(f"Invalid config {where}: {e}") from e


def build_model(config, num_classes: int):
  """``(model, cut_fn)``: the staged network and ``point -> Cut``.

  >>> from experiments.configs import longtail
  >>> model, cut_fn = build_model(longtail.get_config("quick"), 10); model.points
  ('stage1', 'stage2', 'stage3', 'features', 'logits')
  """
  model = get_model(config.model.name, num_classes, **dict(config.model.kwargs))
  return model, functools.partial(cut_staged, model)


def build_methods(config, data, cut_fn, points, spe: int) -> Methods:
  """The activation, logit and gradient methods of ``config.perturb`` for this run.

  The one place a run :class:`~experiments.registry.Context` is made.

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> m = build_methods(config, data, cut_fn, model.points, 7); m.act.init()   # doctest: +SKIP
  """
  ctx = Context(data.num_classes, data.class_counts(), spe, config.optim.num_epochs, cut_fn,
                tuple(points), seed=int(config.seed),
                head=config.model.kwargs.get("head", "linear"))
  pc = config.perturb
  with config_errors(_blocks("activation", pc.activation)):
    act = registry.make_activation(pc, ctx)
  with config_errors(_blocks("gradient", pc.gradient)):
    grad = registry.make_gradient(pc, ctx)
  with config_errors(_blocks("logit", pc.logit)):
    logit = registry.make_logit(pc, ctx)
  if grad.logit is not None:  # LPG: its custom backward sits on the logit method's output
    logit = chain(logit, grad.logit)
  return Methods(act, logit, grad)


def _blocks(level: str, names) -> str:
  """Where a level's methods are configured, for an error message.

  >>> _blocks("logit", "logit_adjust,lpl")
  "for perturb.logit='logit_adjust,lpl' (config.perturb.logit_adjust, config.perturb.lpl)"
  """
  listed = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
  blocks = ", ".join(f"config.perturb.{n}" for n in listed if n and n != "none")
  return f"for perturb.{level}={names!r}" + (f" ({blocks})" if blocks else "")


def build_optimizer(config, spe: int, grad):
  """``(schedule, tx)``: the lr schedule and the optimiser, wrapped by the gradient method.

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> schedule, tx = build_optimizer(config, 7, methods.grad)   # doctest: +SKIP
  """
  oc = config.optim
  with config_errors("in config.optim"):
    schedule = make_schedule(oc, spe, oc.num_epochs)
  tx = make_optimizer(oc, schedule, grad.pre, grad.post)
  return schedule, (grad.wrap(tx) if grad.wrap is not None else tx)


def init_state(config, model, input_shape, tx, methods: Methods, num_classes: int,
               mesh) -> TrainState:
  """The step-0 state, replicated: parameters from ``split(PRNGKey(seed))[0]``, the run's rng
  from ``[1]``.

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> state = init_state(config, model, (28, 28, 1), tx, methods, 10, mesh)   # doctest: +SKIP
  """
  k_init, k_run = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(k_init, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  params = variables.pop("params")
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
                     opt_state=tx.init(params), act_state=methods.act.init(),
                     logit_state=methods.logit.init(), rng=k_run)
  rep = NamedSharding(mesh, P())
  if jax.process_count() > 1:  # every process made the same state: each places its copies
    return jax.tree.map(lambda x: distributed.host_array(np.asarray(x), rep), state)
  return jax.device_put(state, rep)


def make_epoch_perm(config, num_train: int) -> Callable:
  """``epoch -> permutation`` of the training set, from ``fold_in(PRNGKey(seed + 1), epoch)``.

  >>> from experiments.configs import longtail
  >>> make_epoch_perm(longtail.get_config("quick"), 1000)(0).shape      # batch size 128
  (7, 128)
  """
  def epoch_perm(epoch: int):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), epoch)
    return epoch_permutation(key, num_train, config.optim.batch_size)
  return epoch_perm


def make_batch_fn(config, data, mesh, spe: int) -> Callable:
  """``(state, epoch, i, perm=None) -> batch``: step ``epoch * spe + i``'s images gathered on
  device, augmented with the step's data key and normalised (the step sees float inputs).

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> batch = make_batch_fn(config, data, mesh, 7)(state, 0, 0)   # doctest: +SKIP
  """
  if jax.process_count() > 1:  # each process reads only its devices' rows of the batch
    return distributed.make_process_batch_fn(config, data, mesh, spe,
                                             make_epoch_perm(config, data.num_train))
  rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  mean, std = (tuple(s) for s in dataset_stats(config.data.name))
  augment = config.train.augment
  gather = jax.jit(lambda x, y, i, r: prepare_batch(r, x[i], y[i], augment, mean, std),
                   out_shardings=sharded)
  x_train = jax.device_put(data.x_train, rep)
  y_train = jax.device_put(np.asarray(data.y_train, np.int32), rep)
  epoch_perm = make_epoch_perm(config, data.num_train)

  def batch_fn(state: TrainState, epoch: int, i: int, perm=None):
    perm = epoch_perm(epoch) if perm is None else perm
    r_data, _ = step_keys(state.rng, epoch * spe + i)
    return gather(x_train, y_train, perm[i], r_data)
  return batch_fn


def make_predict(config, eval_step, mesh, batch_size: int = 1000) -> Callable:
  """``(state, uint8 images) -> predictions`` in inference mode, batched and sharded.

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> predict = make_predict(config, eval_step, mesh)              # doctest: +SKIP
  >>> predict(state, data.x_test).shape                            # doctest: +SKIP
  (10000,)
  """
  n_dev = mesh.devices.size
  sharded = NamedSharding(mesh, P("data"))
  mean, std = (tuple(s) for s in dataset_stats(config.data.name))
  norm = jax.jit(lambda x: normalize(x, mean, std), out_shardings=sharded)
  bs = max(n_dev, batch_size - batch_size % n_dev)
  # Over several processes a host array must be placed slice by slice, and the sharded
  # predictions gathered from all of them.
  put = jax.device_put if jax.process_count() == 1 else distributed.host_array

  def predict(state: TrainState, images: np.ndarray) -> np.ndarray:
    preds = []
    for s in range(0, len(images), bs):
      chunk = images[s:s + bs]
      pad = (-len(chunk)) % n_dev  # every device gets the same share
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      logits = eval_step(state, norm(put(chunk, sharded)))
      preds.append(distributed.fetch(jnp.argmax(logits, -1))[:len(chunk) - pad])
    return np.concatenate(preds) if preds else np.zeros((0,), np.int64)
  return predict


def _parts(config, data, mesh):
  check_finite_inputs(data)
  spe = steps_per_epoch(config, data.num_train, mesh)
  model, cut_fn = build_model(config, data.num_classes)
  methods = build_methods(config, data, cut_fn, model.points, spe)
  schedule, tx = build_optimizer(config, spe, methods.grad)
  step_cfg = StepConfig(spe, data.num_classes)
  step = jit_train_step(make_train_step(methods.act, methods.logit, tx, step_cfg), mesh)
  state = init_state(config, model, data.x_train.shape[1:], tx, methods, data.num_classes, mesh)
  return spe, model, cut_fn, methods, schedule, step_cfg, step, state


def build_train_step(config, data, mesh):
  """``(jitted_step, initial_state, batch_fn)`` for ``config`` on ``data`` over ``mesh``: the
  same wiring training runs (registry, optimiser, jitted step, initial state, input pipeline).

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> step, state, batch_fn = build_train_step(config, data, make_mesh())   # doctest: +SKIP
  """
  spe, *_, step, state = _parts(config, data, mesh)
  return step, state, make_batch_fn(config, data, mesh, spe)


def build_run(config, data, mesh) -> Run:
  """All of a run's pieces for the loop (see :class:`Run`).

  Not run as a doctest: it needs a loaded ``data`` (the module example runs this path).

  >>> run = build_run(config, data, make_mesh()); run.steps_per_epoch   # doctest: +SKIP
  7
  """
  spe, model, cut_fn, methods, schedule, step_cfg, step, state = _parts(config, data, mesh)
  eval_step = make_eval_step(cut_fn(model.points[-1]), methods.logit, step_cfg, mesh)
  return Run(train_step=step, init_state=state, batch_fn=make_batch_fn(config, data, mesh, spe),
             epoch_perm=make_epoch_perm(config, data.num_train),
             predict=make_predict(config, eval_step, mesh), schedule=schedule,
             steps_per_epoch=spe, mesh=mesh, data=data,
             perturbation=registry.describe_activation(config.perturb, model.points),
             clip_norm=(float(config.perturb.clip.max_norm) if config.perturb.gradient == "clip"
                        else None))
