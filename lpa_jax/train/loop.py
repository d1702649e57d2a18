"""The training loop: ``train_and_evaluate(config, workdir) -> results``.

Resumable (orbax, automatic from ``workdir``), with a progress bar, JSON-lines metrics (and
TensorBoard when ``tensorboardX`` is installed), and a clear stop on a non-finite loss.
The loop dispatches step ``t`` before reading step ``t-1``'s metrics, so the device never waits
on the host.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lpa_jax import data as lpa_data
from lpa_jax.data.pipeline import dataset_stats, epoch_permutation, normalize, prepare_batch
from lpa_jax.models import get_model
from lpa_jax.perturb import registry
from lpa_jax.perturb.base import Context, chain_logits
from lpa_jax.perturb.classes import ClassStats
from lpa_jax.perturb.hooks import cut_staged
from lpa_jax.train import checkpoint, evaluate
from lpa_jax.train.schedules import make_optimizer, make_schedule
from lpa_jax.train.state import TrainState
from lpa_jax.train.step import (StepConfig, jit_train_step, make_eval_step, make_mesh,
                                make_train_step, step_keys)

try:  # optional: progress bars
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - GPU machines may lack tqdm
  tqdm = None


class Experiment:
  """Everything built from a config: data, model, methods, jitted steps and the initial state.

  Notebooks use it directly; :func:`train_and_evaluate` drives it.
  """

  def __init__(self, config, mesh=None, data=None):
    self.config = config
    self.data = data if data is not None else lpa_data.load_task_data(config.data)
    self.mesh = mesh if mesh is not None else make_mesh()
    d, oc = self.data, config.optim
    n_dev = self.mesh.devices.size
    if oc.batch_size % n_dev:
      raise ValueError(f"optim.batch_size={oc.batch_size} must be divisible by the number of "
                       f"devices ({n_dev})")
    if d.num_train < oc.batch_size:
      raise ValueError(f"optim.batch_size={oc.batch_size} exceeds the {d.num_train} training "
                       "examples")
    self.steps_per_epoch = d.num_train // oc.batch_size
    self.num_steps = self.steps_per_epoch * oc.num_epochs
    self.model = get_model(config.model.name, d.num_classes, **dict(config.model.kwargs))
    self.cut_fn = functools.partial(cut_staged, self.model)
    points = tuple(self.model.points)
    self.ctx = Context(d.num_classes, d.class_counts(), self.steps_per_epoch, oc.num_epochs,
                       self.cut_fn, points)
    pc = config.perturb
    self.act = registry.make_activation(pc, self.ctx)
    grad = registry.make_gradient(pc, self.ctx)
    self.logit = registry.make_logit(pc, self.ctx)
    if grad.logit is not None:  # LPG: its custom backward sits on the logit method's output
      self.logit = chain_logits(self.logit, grad.logit)
    self.schedule = make_schedule(oc, self.steps_per_epoch, oc.num_epochs)
    tx = make_optimizer(oc, self.schedule, grad.pre, grad.post)
    self.tx = grad.wrap(tx) if grad.wrap is not None else tx
    mean, std = dataset_stats(config.data.name)
    self.mean, self.std = tuple(mean), tuple(std)
    self.step_cfg = StepConfig(self.steps_per_epoch, d.num_classes, grad.needs_grad_fn)
    self.train_step = jit_train_step(
        make_train_step(self.act, self.logit, self.tx, self.step_cfg), self.mesh)
    self.eval_step = make_eval_step(self.cut_fn(points[-1]), self.logit, self.step_cfg, self.mesh)
    self.rep = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P("data"))
    augment = config.train.augment
    self._gather = jax.jit(
        lambda x, y, i, r: prepare_batch(r, x[i], y[i], augment, self.mean, self.std),
        out_shardings=self.sharded)
    self._normalize = jax.jit(lambda x: normalize(x, self.mean, self.std),
                              out_shardings=self.sharded)
    self.x_train = jax.device_put(d.x_train, self.rep)
    self.y_train = jax.device_put(np.asarray(d.y_train, np.int32), self.rep)

  def init_state(self) -> TrainState:
    key = jax.random.PRNGKey(self.config.seed)
    k_init, k_run = jax.random.split(key)
    x0 = jnp.zeros((1,) + self.data.x_train.shape[1:], jnp.float32)
    variables = self.model.init(k_init, x0, train=False)
    params = variables.pop("params")
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
                       opt_state=self.tx.init(params), act_state=self.act.init(),
                       logit_state=self.logit.init(),
                       class_stats=ClassStats.zeros(self.data.num_classes), rng=k_run)
    return jax.device_put(state, self.rep)

  def batch(self, state: TrainState, epoch: int, i: int, perm=None):
    """The step's input batch: images gathered, augmented with the step's data key, normalised."""
    if perm is None:
      perm = self.epoch_perm(epoch)
    r_data, _ = step_keys(state.rng, epoch * self.steps_per_epoch + i)
    return self._gather(self.x_train, self.y_train, perm[i], r_data)

  def epoch_perm(self, epoch: int):
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), epoch)
    return epoch_permutation(key, self.data.num_train, self.config.optim.batch_size)

  def predict(self, state: TrainState, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class predictions in inference mode, batched and sharded."""
    n_dev = self.mesh.devices.size
    bs = max(n_dev, batch_size - batch_size % n_dev)
    preds = []
    for s in range(0, len(images), bs):
      chunk = images[s:s + bs]
      pad = (-len(chunk)) % n_dev
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      logits = self.eval_step(state, self._normalize(jax.device_put(chunk, self.sharded)))
      preds.append(np.asarray(jnp.argmax(logits, -1))[:len(chunk) - pad])
    return np.concatenate(preds) if preds else np.zeros((0,), np.int64)

  def evaluate(self, state: TrainState, full: bool = True) -> dict:
    """Test accuracy plus the task's breakdowns (see :mod:`lpa_jax.train.evaluate`)."""
    d = self.data
    pred = self.predict(state, d.x_test)
    out = {"test_accuracy": evaluate.accuracy(pred, d.y_test),
           "per_class_accuracy": evaluate.per_class_accuracy(pred, d.y_test, d.num_classes)}
    counts = d.class_counts()
    if counts.max() > 2 * max(counts.min(), 1):
      out["shot_accuracy"] = evaluate.shot_accuracy(out["per_class_accuracy"], counts)
    if d.x_val is not None:
      out["val_accuracy"] = evaluate.accuracy(self.predict(state, d.x_val), d.y_val)
    if full and "noise_mask" in d.extras:
      ptrain = self.predict(state, d.x_train)
      out.update(evaluate.noisy_label_metrics(ptrain, d.y_train, d.extras["y_train_clean"],
                                              d.extras["noise_mask"]))
    if full and "train_domain" in d.extras and d.x_val is not None:
      out["val_domain_accuracy"] = _per_domain(self.predict(state, d.x_val), d.y_val,
                                               d.extras["val_domain"], d.extras["domain_names"])
    return out


def _per_domain(pred, labels, domains, names):
  domains = np.asarray(domains)
  return {names[int(k)]: evaluate.accuracy(pred[domains == k], np.asarray(labels)[domains == k])
          for k in np.unique(domains)}


class MetricLog:
  """Per-epoch means of the step metrics; per-class vectors (``*_C``) weighted by presence."""

  def __init__(self):
    self.rows = []

  def add(self, m: dict):
    self.rows.append(m)

  def flush(self) -> dict:
    if not self.rows:
      return {}
    out = {}
    present = np.stack([r["present_C"] for r in self.rows]) if "present_C" in self.rows[0] else None
    for k in self.rows[0]:
      v = np.stack([np.asarray(r[k], np.float64) for r in self.rows])
      if k.endswith("_C") and present is not None and k != "present_C":
        out[k] = (np.sum(v * present, 0) / np.maximum(present.sum(0), 1)).tolist()
      elif v.ndim == 1:
        out[k] = float(v.mean())
      else:
        out[k] = v.mean(0).tolist()
    self.rows = []
    return out


def _check_finite(metrics: dict, step: int):
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Training stopped: loss became {loss} at step {step}. Lower optim.lr, check the "
        "perturbation radius (perturb.*.eps) or enable gradient clipping "
        "(--config.perturb.gradient=clip). The last good checkpoint is kept in the work dir.")


def _writer(workdir: str):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       max_steps: int | None = None, data=None) -> dict | None:
  """Trains from ``config`` in ``workdir`` (resuming if a checkpoint is there) and writes
  ``results.json``; returns the results dict.

  ``max_steps`` stops this invocation after that many steps with a checkpoint (for jobs under
  a time limit); it returns ``None`` then, and the same call later continues the run.
  ``data`` (a :class:`~lpa_jax.data.TaskData`) skips loading, e.g. when a sweep shares one.

  >>> results = train_and_evaluate(get_config("quick"), "/tmp/lt_quick")
  """
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  exp = Experiment(config, data=data)
  mgr = checkpoint.manager(workdir)
  state = checkpoint.restore_latest(mgr, exp.init_state())
  start = int(jax.device_get(state.step))
  spe, n_epochs = exp.steps_per_epoch, config.optim.num_epochs
  history_path = os.path.join(workdir, "metrics.jsonl")
  if start == 0 and os.path.exists(history_path):
    os.remove(history_path)
  tb = _writer(workdir)
  bar = tqdm(total=exp.num_steps, initial=start, disable=not progress or tqdm is None,
             desc=os.path.basename(os.path.normpath(workdir)), dynamic_ncols=True)
  log, pending, best = MetricLog(), None, _best_from_history(history_path)
  stop_at = exp.num_steps if max_steps is None else min(exp.num_steps, start + max_steps)
  try:
    for epoch in range(start // spe, n_epochs):
      perm = exp.epoch_perm(epoch)
      for i in range(start % spe if epoch == start // spe else 0, spe):
        if epoch * spe + i >= stop_at:
          checkpoint.save(mgr, state, force=True)
          return None
        state, metrics = exp.train_step(state, exp.batch(state, epoch, i, perm))
        if pending is not None:
          host = jax.device_get(pending[1])
          _check_finite(host, pending[0])
          log.add(host)
          bar.set_postfix(loss=f"{float(host['loss']):.3f}", refresh=False)
        pending = (epoch * spe + i, metrics)
        bar.update(1)
      host = jax.device_get(pending[1])
      _check_finite(host, pending[0])
      log.add(host)
      pending = None
      row = {"epoch": epoch + 1, "step": (epoch + 1) * spe, "lr": float(exp.schedule((epoch + 1) * spe - 1)),
             **log.flush()}
      if (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == n_epochs:
        ev = exp.evaluate(state, full=False)
        row.update({k: v for k, v in ev.items() if k in ("test_accuracy", "val_accuracy")})
        best = _update_best(best, row)
      with open(history_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if tb is not None:
        for k, v in row.items():
          if isinstance(v, float):
            tb.add_scalar(k, v, row["step"])
      if (epoch + 1) % config.train.checkpoint_every == 0 or epoch + 1 == n_epochs:
        checkpoint.save(mgr, state)
  except KeyboardInterrupt:
    checkpoint.save(mgr, state, force=True)
    print(f"\nInterrupted: checkpoint saved at step {int(state.step)} in {workdir}; "
          "rerun the same command to resume.")
    raise
  finally:
    bar.close()
    if tb is not None:
      tb.close()
  results = _results(exp, state, best, workdir, time.time() - t0)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def _best_from_history(path):
  best = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        best = _update_best(best, json.loads(line))
  return best


def _update_best(best, row):
  """Model selection by in-domain validation accuracy (DomainBed's training-domain rule)."""
  if "val_accuracy" not in row:
    return best
  if best is None or row["val_accuracy"] > best["val_accuracy"]:
    return {k: row[k] for k in ("epoch", "val_accuracy", "test_accuracy") if k in row}
  return best


def _results(exp: Experiment, state, best, workdir, wall) -> dict:
  d = exp.data
  res = exp.evaluate(state, full=True)
  if best is not None:
    res["selected_by_val"] = best
  res.update({
      "dataset": d.name, "num_train": int(d.num_train), "num_classes": int(d.num_classes),
      "class_names": list(d.class_names), "train_class_counts": d.class_counts().tolist(),
      "steps": int(jax.device_get(state.step)),
      "config": json.loads(exp.config.to_json_best_effort()),
      "devices": [str(x) for x in exp.mesh.devices.flat],
      "wall_time_s": wall, "workdir": os.path.abspath(workdir),
  })
  return res
