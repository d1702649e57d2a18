"""The pure train step ``(state, batch) -> (state, metrics)`` and the evaluation step.

Both are jitted once over a ``('data',)`` mesh: the batch is sharded over devices, the state
(parameters, optimiser state, class tables) is replicated.  Because the step is jitted over the
*global* batch, class-level quantities (``δ_c``, class gradient means, statistics) are
computed from the whole batch, exactly as on one device.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lpa_jax.perturb.base import Perturbation, chain, invalid_label_count
from lpa_jax.perturb.hooks import Cut, full_apply
from lpa_jax.perturb.place import perturbed_apply
from lpa_jax.train.state import TrainState


class StepConfig(NamedTuple):
  steps_per_epoch: int
  num_classes: int


def step_keys(rng: jax.Array, step) -> tuple[jax.Array, jax.Array]:
  """``(data_key, method_key)`` of a step: the input pipeline augments with the first, the
  perturbation methods draw from the second; both are ``fold_in(rng, step)`` split in two."""
  r_data, r_method = jax.random.split(jax.random.fold_in(rng, step))
  return r_data, r_method


def make_mesh(devices=None) -> Mesh:
  """A 1-D ``('data',)`` mesh over all (or the given) devices, with Auto axes."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def _refresh(state: TrainState, act: Perturbation, logit: Perturbation, spe: int):
  """At an epoch boundary every method re-splits from the class statistics in its own state,
  which start afresh."""
  new_epoch = (state.step > 0) & (state.step % spe == 0)
  epoch = state.step // spe
  act_state = jax.lax.cond(new_epoch, lambda: act.refresh(state.act_state, None, epoch),
                           lambda: state.act_state)
  logit_state = jax.lax.cond(new_epoch, lambda: logit.refresh(state.logit_state, None, epoch),
                             lambda: state.logit_state)
  return act_state, logit_state


def make_train_step(act: Perturbation, logit: Perturbation, tx: optax.GradientTransformation,
                    cfg: StepConfig) -> Callable:
  """Builds the (unjitted) train step ``(state, batch) -> (state, metrics)``.

  ``act`` is an activation method placed in the network (a network-level perturbation:
  :func:`lpa_jax.perturb.place.place`, ``manifold_mixup``, ``lpa_adaptive``) and ``logit``
  the logit perturbation (or chain) after it; the step runs ``chain(act, logit)`` through
  :func:`~lpa_jax.perturb.place.perturbed_apply`, so PGD follows ``logit``'s loss and
  weights.  ``batch`` is ``{'image': float inputs, 'label': int labels}``.  See
  :func:`jit_train_step`.

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb import cut_staged, identity, lpa, place
  >>> model = get_model("mlp", 3, widths=(8,))
  >>> x, y = jnp.ones((8, 2, 2, 1)), jnp.arange(8) % 3
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> act = place(lpa(3, split="all_positive", eps=0.1), cut_staged(model, "hidden1"))
  >>> logit, tx, cfg = identity(), optax.sgd(0.1), StepConfig(steps_per_epoch=10, num_classes=3)
  >>> state = TrainState(step=jnp.int32(0), params=params, model_state={},
  ...                    opt_state=tx.init(params), act_state=act.init(),
  ...                    logit_state=logit.init(), rng=jax.random.PRNGKey(0))
  >>> step = jit_train_step(make_train_step(act, logit, tx, cfg), make_mesh())
  >>> state, metrics = step(state, {"image": x, "label": y})
  >>> int(state.step), metrics["loss"].shape
  (1, ())
  """
  if act.level != "network":
    raise TypeError(f"make_train_step: act must be placed at its point (place(method, cut), "
                    f"manifold_mixup, lpa_adaptive), got a {act.level}-level perturbation")
  perturb = chain(act, logit)

  def step(state: TrainState, batch: dict):
    _, r_act = step_keys(state.rng, state.step)
    act_state, logit_state = _refresh(state, act, logit, cfg.steps_per_epoch)
    labels_B = batch["label"]
    onehot_BxC = jax.nn.one_hot(labels_B, cfg.num_classes)

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      out = perturbed_apply(perturb, None, (act_state, logit_state), variables, batch["image"],
                            labels_B, r_act, True, targets=onehot_BxC, step=state.step)
      return out.loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    extra = {}
    if isinstance(tx, optax.GradientTransformationExtraArgs):
      # optax.contrib.sam asks for the loss's gradient function; other members of a chain
      # ignore it, and it is traced only if called.
      extra["grad_fn"] = lambda p, _: jax.grad(lambda q: loss_fn(q)[0])(p)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    # Labels are traced here, so out-of-range ones are counted, not raised on: the loop's
    # host-side check_finite turns a positive count into an error.
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(out.clean_logits, -1) == labels_B),
               "grad_norm": optax.tree.norm(grads), **out.aux,
               "invalid_labels": invalid_label_count(labels_B, cfg.num_classes)}
    new_act_state, new_logit_state = out.state
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state={**state.model_state, **out.model_state},
                              opt_state=opt_state, act_state=new_act_state,
                              logit_state=new_logit_state)
    return new_state, metrics

  return step


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """Jits the step once: state replicated and donated, batch sharded over ``'data'``."""
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))


#: A K-run state: every field carries a leading run axis except the step, which the runs share
#: (they advance together), so step-dependent branches stay real branches under vmap.
PARALLEL_AXES = TrainState(step=None, params=0, model_state=0, opt_state=0, act_state=0,
                           logit_state=0, rng=0)


def jit_parallel_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """Jits K runs of ``step_fn`` as one program: ``jax.vmap`` over a leading run axis of the
  state (all fields but ``step``, see :data:`PARALLEL_AXES`) and of the batch.

  The K-run state is replicated and donated; the ``[K, B, ...]`` batch is sharded over
  ``'data'`` along its batch axis (``P(None, 'data')``).  Each run keeps its own parameters,
  optimiser state, class tables and rng, so class-level quantities stay per run.  Made for
  accelerators: on XLA:CPU vmapped convolutions with per-run kernels become grouped
  convolutions, several times slower than K plain ones (dense layers gain there too).

  >>> from lpa_jax.models import get_model
  >>> from lpa_jax.perturb import cut_staged, identity, lpa, place
  >>> model = get_model("mlp", 3, widths=(8,))
  >>> x, y = jnp.ones((8, 2, 2, 1)), jnp.arange(8) % 3
  >>> act = place(lpa(3, split="all_positive", eps=0.1), cut_staged(model, "hidden1"))
  >>> logit, tx, cfg = identity(), optax.sgd(0.1), StepConfig(steps_per_epoch=10, num_classes=3)
  >>> def state_of(seed):                    # one run's state
  ...   params = model.init(jax.random.key(seed), x)["params"]
  ...   return TrainState(step=jnp.int32(0), params=params, model_state={},
  ...                     opt_state=tx.init(params), act_state=act.init(),
  ...                     logit_state=logit.init(), rng=jax.random.PRNGKey(seed))
  >>> runs = [state_of(0), state_of(1)]      # K = 2 runs, stacked on a leading axis
  >>> state_K = jax.tree.map(lambda *a: jnp.stack(a), *runs).replace(step=jnp.int32(0))
  >>> batch_K = {"image": jnp.stack([x, x]), "label": jnp.stack([y, y])}
  >>> step_fn = make_train_step(act, logit, tx, cfg)
  >>> step_K = jit_parallel_train_step(step_fn, make_mesh())
  >>> state_K, metrics_K = step_K(state_K, batch_K)
  >>> metrics_K["loss"].shape                # one loss per run
  (2,)
  """
  step_K = jax.vmap(step_fn, in_axes=(PARALLEL_AXES, 0), out_axes=(PARALLEL_AXES, 0))
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(None, "data"))
  return jax.jit(step_K, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))


def make_eval_step(cut: Cut, logit: Perturbation, cfg: StepConfig, mesh: Mesh) -> Callable:
  """``(state, x) -> logits`` in inference mode (running BN statistics); ``x`` is float input
  normalised by the input pipeline (:func:`experiments.data.pipeline.normalize`)."""
  def eval_step(state: TrainState, x):
    logits, _ = full_apply(cut, {"params": state.params, **state.model_state}, x, False)
    return logit.predict(state.logit_state, logits)
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(eval_step, in_shardings=(rep, data), out_shardings=data)
