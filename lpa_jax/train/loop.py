"""The training loop: ``train_and_evaluate(config, workdir) -> results``.

Resumable (orbax, automatic from ``workdir``, from the newest checkpoint that passes its
integrity check), with a progress bar, JSON-lines metrics (one row per epoch, also across
kills and resumes; TensorBoard when ``tensorboardX`` is installed), and a clear stop on a
non-finite loss or an activation method that perturbs nothing.  The work dir belongs to one
config (:mod:`lpa_jax.train.workdir`) and to one process at a time (:mod:`lpa_jax.train.lock`);
each checkpoint keeps a copy of the history, which restores a damaged ``metrics.jsonl``.
Ctrl-C stops at a step boundary with a checkpoint.  The loop dispatches step ``t`` before
reading step ``t-1``'s metrics, so the device never waits on the host.  Everything it drives is
built by :mod:`lpa_jax.train.build`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings

import jax

from lpa_jax import data as lpa_data
from lpa_jax.perturb.diagnostics import CAUSES, check_finite
from lpa_jax.train import checkpoint, distributed, lock
from lpa_jax.train.build import Run, build_run
from lpa_jax.train.evaluate import evaluate_task
from lpa_jax.train.guards import (PerturbationTooStrong, check_perturbing, check_strength,
                                  signed_loss_change, strength_summary)
from lpa_jax.train.history import (MetricLog, append_row, best_of, resume_history, to_json_rows,
                                   update_best)
from lpa_jax.train.step import make_mesh
from lpa_jax.train.workdir import claim, config_dict, finite_json, write_json_atomic

try:  # optional: progress bars
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - GPU machines may lack tqdm
  tqdm = None


def _check_finite(metrics: dict, step: int, perturbation=("none", None)):
  """Stops on a non-finite loss, then on a non-finite class statistic, radius, δ or diagnostic
  under a finite loss (naming the method, point and classes): that one would otherwise pass
  silently, e.g. a NaN radius turning δ off.  A non-finite class statistic or radius is
  reported first: it is the cause of what follows."""
  check_finite(metrics, step, method=perturbation[0], point=perturbation[1], names=CAUSES)
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Training stopped: loss became {loss} at step {step}. Lower optim.lr, check the "
        "perturbation radius (perturb.*.eps) or enable gradient clipping "
        "(--config.perturb.gradient=clip). The last good checkpoint is kept in the work dir.")
  check_finite(metrics, step, method=perturbation[0], point=perturbation[1])


def _writer(workdir: str):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


class _StopFlag:
  """Ctrl-C asks the loop to stop at the next step boundary, where the state and the epoch's
  metrics agree and can be saved together; a second Ctrl-C stops at once, unsaved."""

  def __init__(self):
    self.set, self._previous = False, None

  def _handle(self, signum, frame):
    if self.set:
      raise KeyboardInterrupt
    self.set = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach only that one
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def run_steps(train_step, batch_fn, perm, spe: int, state, epoch: int, first: int,
              stop_at: int, log_fn, bar, stop: _StopFlag):
  """Steps ``first..`` of ``epoch`` (up to ``stop_at`` or a Ctrl-C); returns
  ``(state, steps_done)``.  Shared by the single-run and the K-parallel loop.

  Step ``t`` is dispatched before step ``t-1``'s metrics are read (``log_fn(step, metrics)``),
  so the host never stalls the device; every finished step is logged on return.
  """
  pending, i = None, first
  for i in range(first, spe):
    if epoch * spe + i >= stop_at or stop.set:
      break
    state, metrics = train_step(state, batch_fn(state, epoch, i, perm))
    if pending is not None:
      log_fn(*pending)
    pending = (epoch * spe + i, metrics)
    bar.update(1)
  else:
    i = spe
  if pending is not None:
    log_fn(*pending)
  return state, i


def _epoch(run: Run, state, epoch: int, first: int, stop_at: int, log: MetricLog, bar,
           stop: _StopFlag):
  """:func:`run_steps` for one run, logging into ``log``."""
  return run_steps(run.train_step, run.batch_fn, run.epoch_perm(epoch), run.steps_per_epoch,
                   state, epoch, first, stop_at,
                   lambda step, m: _log_step(log, bar, step, m, run.perturbation), bar, stop)


def _log_step(log: MetricLog, bar, step: int, metrics, perturbation=("none", None)):
  host = jax.device_get(metrics)
  _check_finite(host, step, perturbation)
  log.add(host)
  bar.set_postfix(loss=f"{float(host['loss']):.3f}", refresh=False)


def _epoch_row(run: Run, config, state, epoch: int, log: MetricLog, best):
  spe = run.steps_per_epoch
  row = {"epoch": epoch + 1, "step": (epoch + 1) * spe,
         "lr": float(run.schedule((epoch + 1) * spe - 1)), **log.flush()}
  if (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == config.optim.num_epochs:
    ev = evaluate_task(run.predict, state, run.data, full=False)
    row.update({k: v for k, v in ev.items() if k in ("test_accuracy", "val_accuracy")})
  change = signed_loss_change(row)
  if change is not None:
    row["loss_change_signed"] = change
  check_perturbing(row, epoch + 1, run.perturbation)
  _, ceiling = strength_limits(config)
  try:
    check_strength(row, epoch + 1, run.perturbation, ceiling)
  except PerturbationTooStrong as e:
    if _train_get(config, "max_loss_change_action", "warn") == "stop":
      raise
    if not getattr(log, "warned_ceiling", False):  # once per run and invocation;
      log.warned_ceiling = True                     # results.json counts the epochs above it
      warnings.warn(str(e).replace("Training stopped: ", "").replace(
          " The last good checkpoint is kept in the work dir.",
          " (train.max_loss_change_action='stop' stops such a run.)"), stacklevel=2)
  return row, update_best(best, row)


def _train_get(config, key, default):
  train = config.get("train", {}) if hasattr(config, "get") else {}
  return train.get(key, default) if hasattr(train, "get") else default


def strength_limits(config) -> tuple[float | None, float | None]:
  """``(floor, ceiling)`` in nats for the epochs' ``loss_change_signed``: the config's
  ``train.min_loss_change`` (default 0.05, SPEC §1) and ``train.max_loss_change`` (default
  1.0); ``None`` (or an infinite ceiling) switches one off."""
  ceiling = _train_get(config, "max_loss_change", 1.0)
  return (_train_get(config, "min_loss_change", 0.05),
          None if ceiling is not None and math.isinf(ceiling) else ceiling)


def _save(mgr, state, log: MetricLog, history: list[str], force: bool = False):
  # The steps of a partly done epoch travel with the checkpoint, so the epoch's row after a
  # resume averages over all of its steps, not only those after the resume; so do the rows of
  # the finished epochs, the durable copy of metrics.jsonl.
  checkpoint.save(mgr, state, extra={"epoch_rows": to_json_rows(log.rows),
                                     "history": list(history)}, force=force)


def _close(bar, tb, failing: bool):
  """Closes the progress bar and TensorBoard writer; while another error is propagating, a
  failure here (e.g. the same full disk) must not replace it."""
  for obj in (bar, tb):
    try:
      if obj is not None:
        obj.close()
    except Exception:  # noqa: BLE001
      if not failing:
        raise


def _train(run: Run, config, state, workdir, mgr, log: MetricLog, history: list[str], best,
           stop_at, progress):
  """Runs epochs until ``stop_at``, appending each epoch's row to ``history`` (its lines);
  returns ``(state, best, finished)``."""
  spe, n_epochs = run.steps_per_epoch, config.optim.num_epochs
  start = int(jax.device_get(state.step))
  history_path = os.path.join(workdir, "metrics.jsonl")
  main = distributed.is_main()  # under jax.distributed, one process writes the run's files
  tb = _writer(workdir) if main else None
  bar = tqdm(total=spe * n_epochs, initial=start,
             disable=not (progress and main) or tqdm is None,
             desc=os.path.basename(os.path.normpath(workdir)), dynamic_ncols=True)
  failing = True
  try:
    with _StopFlag() as stop:
      for epoch in range(start // spe, n_epochs):
        first = start % spe if epoch == start // spe else 0
        state, done = _epoch(run, state, epoch, first, stop_at, log, bar, stop)
        if done < spe:
          _save(mgr, state, log, history, force=True)
          _raise_if_stopped(stop, state, workdir)
          failing = False
          return state, best, False
        row, best = _epoch_row(run, config, state, epoch, log, best)
        history.append(append_row(history_path if main else None, row))
        if tb is not None:
          for k, v in row.items():
            if isinstance(v, float):
              tb.add_scalar(k, v, row["step"])
        if (epoch + 1) % config.train.checkpoint_every == 0 or epoch + 1 == n_epochs:
          _save(mgr, state, log, history)
    failing = False
  except KeyboardInterrupt as e:
    if e.args:  # the clean stop's own message
      raise
    raise KeyboardInterrupt(  # a second Ctrl-C: the state may be mid-step, nothing is saved
        f"Interrupted: {workdir} resumes from its last checkpoint (step "
        f"{mgr.latest_step() or 0}); rerun the same command to resume.") from None
  finally:
    _close(bar, tb, failing)
  return state, best, True


def _raise_if_stopped(stop: _StopFlag, state, workdir):
  if stop.set:
    raise KeyboardInterrupt(f"Interrupted: checkpoint saved at step "
                            f"{int(jax.device_get(state.step))} in {workdir}; rerun the same "
                            "command to resume.")


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       max_steps: int | None = None, data=None, mesh=None,
                       fresh: bool = False) -> dict | None:
  """Trains from ``config`` in ``workdir`` (resuming if a checkpoint is there) and writes
  ``results.json``; returns the results dict.

  The work dir records its config (``config.json``); rerunning it with a different config
  raises :class:`~lpa_jax.train.workdir.ConfigMismatch` naming the fields, unless ``fresh``
  (delete that run and start afresh).  ``max_steps`` stops this invocation after that many
  steps with a checkpoint (for jobs under a time limit); it returns ``None`` then, and the same
  call later continues the run.  ``data`` (a :class:`~lpa_jax.data.TaskData`) skips loading,
  e.g. when a sweep shares one.  Ctrl-C saves a checkpoint and raises ``KeyboardInterrupt``
  whose message says so.  Another process working in ``workdir`` makes it raise
  :class:`~lpa_jax.train.lock.Busy` naming that process.

  >>> results = train_and_evaluate(get_config("quick"), "/tmp/lt_quick")   # doctest: +SKIP
  """
  t0 = time.time()
  data = data if data is not None else lpa_data.load_task_data(config.data)
  run = build_run(config, data, mesh if mesh is not None else make_mesh())
  main = distributed.is_main()
  # Only now: a config that fails to build leaves no work dir.  Under jax.distributed process 0
  # holds the lock for all of them.
  with lock.hold(workdir) if main else contextlib.nullcontext():
    if main:
      claim(workdir, config, fresh)
    distributed.sync("lpa_jax.claim")  # the others restore only once the work dir is checked
    return _resume_and_train(run, config, data, workdir, progress, max_steps, t0)


def resume(run: Run, workdir: str):
  """``(mgr, state, log, history)`` of the run in ``workdir``: its newest usable checkpoint,
  the metrics of a partly done epoch and the history's lines, ``metrics.jsonl`` checked (and
  restored if damaged) against the copy in the checkpoint."""
  mgr = checkpoint.manager(workdir)
  state, extra = checkpoint.restore_latest(mgr, run.init_state)
  extra = extra or {}
  start = int(jax.device_get(state.step))
  history = resume_history(os.path.join(workdir, "metrics.jsonl"), start, run.steps_per_epoch,
                           extra.get("history"), write=distributed.is_main())
  log = MetricLog(extra.get("epoch_rows", []) if start % run.steps_per_epoch else [])
  return mgr, state, log, history


def _resume_and_train(run: Run, config, data, workdir, progress, max_steps, t0):
  mgr, state, log, history = resume(run, workdir)
  start = int(jax.device_get(state.step))
  total = run.steps_per_epoch * config.optim.num_epochs
  stop_at = total if max_steps is None else min(total, start + max_steps)
  best = best_of(json.loads(x) for x in history)
  state, best, finished = _train(run, config, state, workdir, mgr, log, history, best, stop_at,
                                 progress)
  if not finished:
    return None
  # NaN (e.g. the accuracy of a shot group with no class) is null, in the file and here.
  results = finite_json(_results(config, run, data, state, best, workdir, time.time() - t0,
                                 history))
  if distributed.is_main():
    write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results


PREDICTIONS_FILE = "predictions.npz"


def _results(config, run: Run, data, state, best, workdir, wall, history=()) -> dict:
  """The final evaluation as ``results.json`` holds it; also writes the per-sample test (and
  validation) predictions with their labels to ``predictions.npz`` beside it (paired tests
  between runs, e.g. McNemar's, need them).  ``history`` (the epoch rows' lines) gives the
  activation method's ``perturbation_strength``; one below the floor is warned about."""
  preds = {}
  res = evaluate_task(run.predict, state, data, full=True, predictions=preds)
  if distributed.is_main():
    _write_predictions(os.path.join(workdir, PREDICTIONS_FILE), preds, data)
  if best is not None:
    res["selected_by_val"] = best
  strength = strength_summary([json.loads(x) for x in history], *strength_limits(config))
  if strength is not None:
    res["perturbation_strength"] = strength
    if strength["below_floor"]:
      method, point = run.perturbation
      warnings.warn(
          f"{method} at {point!r} moved the loss of the classes it perturbs by only "
          f"{strength['median_second_half']:.3f} nats (median over the second half of "
          f"training), below the {strength['floor']:g}-nat floor at which a perturbation "
          "counts as measurable (SPEC §1): this run is close to plain training. A larger "
          "radius (perturb.*.eps) perturbs more; results.json records the per-epoch values.",
          stacklevel=2)
  res.update({
      "dataset": data.name, "num_train": int(data.num_train), "num_classes": int(data.num_classes),
      "class_names": list(data.class_names), "train_class_counts": data.class_counts().tolist(),
      "steps": int(jax.device_get(state.step)), "config": config_dict(config),
      "devices": [str(x) for x in run.mesh.devices.flat],
      "wall_time_s": wall, "workdir": os.path.abspath(workdir), "code": code_version(),
  })
  return res


def _write_predictions(path: str, preds: dict, data) -> None:
  import numpy as np
  arrays = {f"{k}_pred": np.asarray(v, np.int16) for k, v in preds.items()}
  arrays["test_label"] = np.asarray(data.y_test, np.int16)
  if "val" in preds:
    arrays["val_label"] = np.asarray(data.y_val, np.int16)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def code_version() -> dict:
  """The git commit of the code that ran (``dirty`` when it had uncommitted changes; ``None``
  outside a git checkout) and ``XLA_FLAGS``: every run records what produced it (on XLA:CPU
  the thread count changes the floating-point sums, so a rerun matches exactly only under the
  same flags)."""
  import subprocess
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=here, capture_output=True, text=True, timeout=10,
                            check=True).stdout
  except (OSError, subprocess.SubprocessError):
    commit, status = None, None
  return {"commit": commit, "dirty": None if status is None else bool(status.strip()),
          "xla_flags": os.environ.get("XLA_FLAGS")}
