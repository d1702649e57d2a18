"""The training loop: ``train_and_evaluate(config, workdir) -> results``.

Resumable (orbax, automatic from ``workdir``, from the newest checkpoint that passes its
integrity check), with a progress bar, JSON-lines metrics (one row per epoch, also across
kills and resumes; TensorBoard when ``tensorboardX`` is installed), and a clear stop on a
non-finite loss or an activation method that perturbs nothing.  The work dir belongs to one
config (:mod:`experiments.train.workdir`) and to one process at a time
(:mod:`experiments.train.lock`);
each checkpoint keeps a copy of the history, which restores a damaged ``metrics.jsonl``.
Ctrl-C or SIGTERM stops at a step boundary with a checkpoint, and one after the last step
(final evaluation, writing results) leaves ``results.json`` unwritten.  The loop dispatches
step ``t`` before reading step ``t-1``'s metrics, so the device never waits on the host.
Everything it drives is built by :mod:`experiments.train.build`.

One loop trains a :class:`Group`: one run (:func:`single`) or K seeds of a config as one
vmapped program (:func:`experiments.train.parallel.build_parallel`), each run with its own work
dir, metrics, checkpoints and ``results.json``.
"""

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from typing import Callable, NamedTuple

import jax
import numpy as np

from experiments import cli
from experiments import data as lpa_data
from lpa_jax.perturb.diagnostics import CAUSES, check_finite
from experiments.train import checkpoint, distributed, lock
from experiments.train.build import Run, build_run
from experiments.train.evaluate import evaluate_task
from experiments.train.guards import (PerturbationTooStrong, check_perturbing, check_strength,
                                  signed_loss_change)
from experiments.train.results import code_version  # noqa: F401  (re-exported: older imports)
from experiments.train.results import final_results, strength_limits, train_option
from experiments.train.history import (MetricLog, append_row, best_of, resume_history, to_json_rows,
                                   update_best)
from lpa_jax.train.step import make_mesh
from experiments.train.workdir import claim, finite_json, write_json_atomic

try:  # optional: progress bars
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - GPU machines may lack tqdm
  tqdm = None


class Group(NamedTuple):
  """What the loop drives: K runs of one config trained as one program (K = 1: a single run,
  its own un-vmapped step), each with its own work dir, log, history and checkpoints.

  :func:`single` makes the K = 1 group of a :class:`~experiments.train.build.Run`;
  :func:`experiments.train.parallel.build_parallel` the K-run one, whose state and metrics carry a
  leading run axis.
  """
  run: Run                # run 0's pieces: predict, schedule, steps per epoch, mesh, data
  train_step: Callable    # jitted (state, batch) -> (state, metrics)
  init_states: tuple      # each run's own step-0 TrainState (its own seed)
  batch_fn: Callable      # (state, epoch, i, perm) -> batch
  epoch_perm: Callable    # epoch -> the group's permutation of the training set
  stack: Callable         # [each run's state] -> the group's state
  state_of: Callable      # (group state, k) -> run k's state, as a separate run has it
  metrics_of: Callable    # (host metrics, k) -> run k's metrics

  @property
  def size(self) -> int:
    return len(self.init_states)


def single(run: Run) -> Group:
  """The one-run group of ``run``: its own step, state and metrics, no run axis."""
  return Group(run, run.train_step, (run.init_state,), run.batch_fn, run.epoch_perm,
               stack=lambda states: states[0], state_of=lambda state, k: state,
               metrics_of=lambda metrics, k: metrics)


def check_step(metrics: dict, step: int, perturbation=("none", None)):
  """Stops on a non-finite loss, then on a non-finite class statistic, radius, δ or diagnostic
  under a finite loss (naming the method, point and classes): that one would otherwise pass
  silently, e.g. a NaN radius turning δ off.  A non-finite class statistic or radius is
  reported first: it is the cause of what follows.  ``metrics`` are one step's, on the host."""
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


class StopFlag:
  """Ctrl-C or SIGTERM (:data:`~experiments.cli.STOP_SIGNALS`) asks the loop to stop at the
  next step boundary, where the state and the epoch's metrics agree and can be saved together;
  a second one stops at once, unsaved.  ``set`` says whether a stop was asked for, ``signum``
  by which signal."""

  def __init__(self):
    self.signum, self._previous = None, {}

  @property
  def set(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.set:
      raise cli.Interrupted(signum=signum)  # no message: the loop says what is left
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach only that one
      for signum in cli.STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class NoBar:
  """A progress bar that shows nothing (no tqdm, or a caller that times the loop)."""

  def __getattr__(self, _):
    return lambda *a, **k: None


def run_steps(train_step, batch_fn, perm, spe: int, state, epoch: int, first: int,
              stop_at: int, log_fn, bar, stop: StopFlag):
  """Steps ``first..`` of ``epoch`` (up to ``stop_at`` or a Ctrl-C); returns
  ``(state, steps_done)``.

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


def _named(workdirs, k: int, e: Exception):
  """``e`` with run ``k``'s work dir in front when several runs share the loop (the others
  keep their last checkpoints)."""
  return e if len(workdirs) == 1 else type(e)(f"{workdirs[k]}: {e}")


def run_epoch(group: Group, state, epoch: int, first: int, stop_at: int, logs, bar,
              stop: StopFlag, workdirs):
  """:func:`run_steps` for every run of ``group``, run ``k`` checked (:func:`check_step`) and
  logged into ``logs[k]``; returns ``(state, steps_done)``."""
  def log_fn(step, metrics):
    host = jax.device_get(metrics)
    for k, log in enumerate(logs):
      host_k = group.metrics_of(host, k)
      try:
        check_step(host_k, step, group.run.perturbation)
      except FloatingPointError as e:
        raise _named(workdirs, k, e) from None
      if group.run.clip_norm is not None:  # the share of steps clipping acted on
        host_k = {**host_k, "clipped": float(host_k["grad_norm"] > group.run.clip_norm)}
      log.add(host_k)
    bar.set_postfix(loss=f"{float(np.mean(host['loss'])):.3f}", refresh=False)
  return run_steps(group.train_step, group.batch_fn, group.epoch_perm(epoch),
                   group.run.steps_per_epoch, state, epoch, first, stop_at, log_fn, bar, stop)


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
    if train_option(config, "max_loss_change_action", "warn") == "stop":
      raise
    if not getattr(log, "warned_ceiling", False):  # once per run and invocation;
      log.warned_ceiling = True                     # results.json counts the epochs above it
      warnings.warn(str(e).replace("Training stopped: ", "").replace(
          " The last good checkpoint is kept in the work dir.",
          " (train.max_loss_change_action='stop' stops such a run.)"), stacklevel=2)
  return row, update_best(best, row)


def _save_all(group: Group, mgrs, state, logs, histories, elapsed, force: bool = False):
  # The steps of a partly done epoch travel with each checkpoint, so the epoch's row after a
  # resume averages over all of its steps, not only those after the resume; so do the rows of
  # the finished epochs, the durable copy of metrics.jsonl, and the run's wall time so far
  # (``elapsed()``: per run), so a resumed run's results.json counts every invocation.
  for k, (mgr, log, history, wall) in enumerate(zip(mgrs, logs, histories, elapsed())):
    checkpoint.save(mgr, group.state_of(state, k),
                    extra={"epoch_rows": to_json_rows(log.rows), "history": list(history),
                           "wall_time_s": wall}, force=force)


def _close(objs, failing: bool):
  """Closes progress bars and TensorBoard writers; while another error is propagating, a
  failure here (e.g. the same full disk) must not replace it."""
  for obj in objs:
    try:
      if obj is not None:
        obj.close()
    except Exception:  # noqa: BLE001
      if not failing:
        raise


def _finish_epoch(group: Group, configs, state, epoch, logs, bests, histories, workdirs, tbs):
  """Each run's epoch row (its own evaluation) into its own ``metrics.jsonl``."""
  main = distributed.is_main()  # under jax.distributed, one process writes the run's files
  for k, (config, workdir, tb) in enumerate(zip(configs, workdirs, tbs)):
    try:
      row, bests[k] = _epoch_row(group.run, config, group.state_of(state, k), epoch, logs[k],
                                 bests[k])
    except FloatingPointError as e:
      raise _named(workdirs, k, e) from None
    path = os.path.join(workdir, "metrics.jsonl") if main else None
    histories[k].append(append_row(path, row))
    if tb is not None:
      for name, v in row.items():
        if isinstance(v, float):
          tb.add_scalar(name, v, row["step"])


def _train(group: Group, configs, state, workdirs, mgrs, logs, histories, bests, stop_at,
           progress, elapsed, stop: StopFlag):
  """Runs epochs until ``stop_at`` or a stop (``stop``), appending each run's epoch rows to its
  history (its lines); returns ``(state, finished)`` (``bests`` updated in place).
  ``elapsed()`` gives each run's wall time so far, saved with its checkpoints."""
  spe, n_epochs = group.run.steps_per_epoch, configs[0].optim.num_epochs
  start = int(jax.device_get(state.step))
  main = distributed.is_main()
  tbs = [_writer(w) if main else None for w in workdirs]
  desc = (os.path.basename(os.path.normpath(workdirs[0])) if group.size == 1
          else f"{group.size} runs")
  bar = (tqdm(total=spe * n_epochs, initial=start, disable=not (progress and main), desc=desc,
              dynamic_ncols=True) if tqdm is not None else NoBar())
  failing = True
  try:
    for epoch in range(start // spe, n_epochs):
      first = start % spe if epoch == start // spe else 0
      state, done = run_epoch(group, state, epoch, first, stop_at, logs, bar, stop, workdirs)
      if done < spe:
        _save_all(group, mgrs, state, logs, histories, elapsed, force=True)
        _raise_if_stopped(stop, state, workdirs)
        failing = False
        return state, False
      _finish_epoch(group, configs, state, epoch, logs, bests, histories, workdirs, tbs)
      if (epoch + 1) % configs[0].train.checkpoint_every == 0 or epoch + 1 == n_epochs:
        _save_all(group, mgrs, state, logs, histories, elapsed)
    failing = False
  finally:
    _close([bar, *tbs], failing)
  return state, True


def _unsaved(e: KeyboardInterrupt, mgrs, workdirs) -> KeyboardInterrupt:
  """The stop a second signal (or a plain ``KeyboardInterrupt``) made: the state may be
  mid-step, nothing is saved; the clean stop's own message is kept."""
  if e.args:
    return e
  n = len(workdirs)
  return cli.Interrupted(
      f"{cli.stopped_by(getattr(e, 'signum', signal.SIGINT))}: {', '.join(workdirs)} "
      f"resume{'s' if n == 1 else ''} from {'its' if n == 1 else 'their'} last checkpoint "
      f"(step {mgrs[0].latest_step() or 0}); rerun the same command to resume.",
      getattr(e, "signum", signal.SIGINT))


def _raise_if_stopped(stop: StopFlag, state, workdirs, phase: str = "training"):
  """Raises :class:`~experiments.cli.Interrupted` saying what was saved, if a stop was asked
  for: in ``phase`` ``'training'`` (a checkpoint at this step), ``'evaluating'`` (training is
  done and checkpointed, the results are not written) or ``'finished'`` (they are)."""
  if not stop.set:
    return
  step, dirs, s = int(jax.device_get(state.step)), ", ".join(workdirs), \
      "s" if len(workdirs) > 1 else ""
  word, whose = cli.stopped_by(stop.signum), "runs' results.json" if s else "run's results.json"
  raise cli.Interrupted({
      "training": f"{word}: checkpoint{s} saved at step {step} in {dirs}; rerun the same "
                  "command to resume.",
      "evaluating": f"{word} after the last step: checkpoint{s} saved at step {step} in "
                    f"{dirs}, results.json not written; rerun the same command to evaluate "
                    "and write it.",
      "finished": f"{word}: {dirs} hold{'' if s else 's'} the finished {whose}.",
  }[phase], stop.signum)


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       max_steps: int | None = None, data=None, mesh=None,
                       fresh: bool = False) -> dict | None:
  """Trains from ``config`` in ``workdir`` (resuming if a checkpoint is there) and writes
  ``results.json``; returns the results dict.

  The work dir records its config (``config.json``); rerunning it with a different config
  raises :class:`~experiments.train.workdir.ConfigMismatch` naming the fields, unless ``fresh``
  (delete that run and start afresh).  ``max_steps`` stops this invocation after that many
  steps with a checkpoint (for jobs under a time limit); it returns ``None`` then, and the same
  call later continues the run.  ``data`` (a :class:`~experiments.data.TaskData`) skips loading,
  e.g. when a sweep shares one.  Ctrl-C or SIGTERM saves a checkpoint and raises
  :class:`~experiments.cli.Interrupted` (a ``KeyboardInterrupt``) whose message says so; after
  the last step ``results.json`` is then not written (a rerun evaluates the checkpoint).
  Another process working in ``workdir`` makes it raise :class:`~experiments.train.lock.Busy`
  naming that process.

  Not run as a doctest: it trains (minutes on a CPU) and needs the Fashion-MNIST data.

  >>> results = train_and_evaluate(get_config("quick"), "/tmp/lt_quick")   # doctest: +SKIP
  """
  t0 = time.time()
  data = data if data is not None else lpa_data.load_task_data(config.data)
  group = single(build_run(config, data, mesh if mesh is not None else make_mesh()))
  main = distributed.is_main()
  # Only now: a config that fails to build leaves no work dir.  Under jax.distributed process 0
  # holds the lock for all of them.
  with lock.hold(workdir) if main else contextlib.nullcontext():
    if main:
      claim(workdir, config, fresh)
    distributed.sync("lpa_jax.claim")  # the others restore only once the work dir is checked
    out = train_resumed(group, [config], [workdir], data, resume_group(group, [workdir]),
                        progress, max_steps, t0)
  return None if out is None else out[0]


def resume(run: Run, workdir: str):
  """``(mgr, state, log, history, wall_s)`` of the run in ``workdir``: its newest usable
  checkpoint, the metrics of a partly done epoch, the history's lines (``metrics.jsonl``
  checked, and restored if damaged, against the copy in the checkpoint) and the wall time the
  run had spent up to that checkpoint (0 for a new run)."""
  mgr = checkpoint.manager(workdir)
  state, extra = checkpoint.restore_latest(mgr, run.init_state)
  extra = extra or {}
  start = int(jax.device_get(state.step))
  history = resume_history(os.path.join(workdir, "metrics.jsonl"), start, run.steps_per_epoch,
                           extra.get("history"), write=distributed.is_main())
  log = MetricLog(extra.get("epoch_rows", []) if start % run.steps_per_epoch else [])
  return mgr, state, log, history, float(extra.get("wall_time_s", 0.0))


def resume_group(group: Group, workdirs) -> list[tuple]:
  """:func:`resume` of each run of ``group`` (from its own initial state) in its work dir."""
  return [resume(group.run._replace(init_state=s), w)
          for s, w in zip(group.init_states, workdirs)]


def train_resumed(group: Group, configs, workdirs, data, resumed, progress: bool,
                  max_steps: int | None, t0: float) -> list[dict] | None:
  """Trains the runs of ``group`` on from ``resumed`` (:func:`resume_group`; every run at the
  same step) and writes each run's ``results.json``; returns the results, or ``None`` when
  ``max_steps`` stopped this invocation first.  With several runs each ``results.json``
  records its share of the group's wall time and ``parallel: {runs, group_wall_time_s}``.
  ``wall_time_s`` adds the time earlier invocations spent up to the checkpoint this one
  resumed from (work redone after a hard kill is counted once, when redone)."""
  mgrs, states, logs, histories, priors = (list(x) for x in zip(*resumed))
  steps = sorted({int(jax.device_get(s.step)) for s in states})
  if len(steps) > 1:
    raise ValueError(f"The runs of a group must resume from one step, got steps {steps}")
  spe, n_runs = group.run.steps_per_epoch, group.size
  total = spe * configs[0].optim.num_epochs
  stop_at = total if max_steps is None else min(total, steps[0] + max_steps)
  bests = [best_of(json.loads(x) for x in h) for h in histories]
  def elapsed():
    return [p + (time.time() - t0) / n_runs for p in priors]

  with StopFlag() as stop:  # also after the last step: a stop there must not be lost
    try:
      state, finished = _train(group, configs, group.stack(states), workdirs, mgrs, logs,
                               histories, bests, stop_at, progress, elapsed, stop)
      if not finished:
        return None
      return _evaluate_and_write(group, configs, workdirs, data, state, bests, histories,
                                 elapsed, t0, stop)
    except KeyboardInterrupt as e:
      raise _unsaved(e, mgrs, workdirs) from None


def _evaluate_and_write(group: Group, configs, workdirs, data, state, bests, histories, elapsed,
                        t0: float, stop: StopFlag) -> list[dict]:
  """Each run's final evaluation, written to its ``results.json``.  A stop asked for before
  they are written leaves them unwritten (the last step's checkpoint is saved, so a rerun
  evaluates it and writes them); one asked for while they are written still raises, so that a
  sweep stops rather than going on to its next run."""
  _raise_if_stopped(stop, state, workdirs, "evaluating")  # e.g. during the last epoch's end
  wall, walls, out = time.time() - t0, elapsed(), []
  for k, (config, workdir) in enumerate(zip(configs, workdirs)):
    # NaN (e.g. the accuracy of a shot group with no class) is null, in the file and here.
    res = final_results(config, group.run, data, group.state_of(state, k), bests[k], workdir,
                        walls[k], histories[k])
    if group.size > 1:
      res["parallel"] = {"runs": group.size, "group_wall_time_s": wall}
    out.append(finite_json(res))
  _raise_if_stopped(stop, state, workdirs, "evaluating")
  if distributed.is_main():
    for workdir, res in zip(workdirs, out):
      write_json_atomic(os.path.join(workdir, "results.json"), res)
  _raise_if_stopped(stop, state, workdirs, "finished")
  return out
