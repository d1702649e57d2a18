"""Stops asked for by a signal (issue 35): SIGTERM, the way a cluster scheduler preempts a job,
is treated as Ctrl-C is (a checkpoint at the next step, one line, exit status 143 where Ctrl-C
gives 130, a sweep stops), and a stop after the last training step (final checkpoint,
evaluation, writing results) is not lost: the results are left unwritten and the rerun
evaluates the saved checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import signal_at_batch, small_config
from experiments.train import loop
from test_survival import CLI, REPO, _default_sigint, _env, _lines, _rows, _suite


class Unhandled(Exception):
  """A SIGTERM that reached the test's own handler: the loop did not handle it."""


@pytest.fixture
def stop_signals():
  """Python's defaults for SIGINT, and for SIGTERM a handler that raises :class:`Unhandled`
  (a SIGTERM the loop does not take would otherwise end this pytest); both put back after."""
  def unhandled(signum, frame):
    raise Unhandled(f"signal {signum} reached the test's handler")
  previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
              signal.SIGTERM: signal.signal(signal.SIGTERM, unhandled)}
  yield {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: unhandled}
  for signum, handler in previous.items():
    signal.signal(signum, handler)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, fmnist_lt):
  """The uninterrupted run the stopped ones must equal once resumed: its results, work dir."""
  wd = tmp_path_factory.mktemp("full")
  cfg = small_config(**{"optim.batch_size": 32})
  return loop.train_and_evaluate(cfg, str(wd), progress=False, data=fmnist_lt), wd


def _same_run(a, b):
  for key in ("steps", "test_accuracy", "per_class_accuracy", "shot_accuracy"):
    assert a[key] == b[key], key


def test_sigterm_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, fmnist_lt, monkeypatch,
                                                              stop_signals, full_run):
  full, full_wd = full_run
  signal_at_batch(monkeypatch, signal.SIGTERM)  # mid-epoch 2
  cfg, part = small_config(**{"optim.batch_size": 32}), str(tmp_path / "part")
  with pytest.raises(KeyboardInterrupt, match=r"^Interrupted by SIGTERM: checkpoint saved at "
                     r"step 10 in .*; rerun the same command to resume\.$") as stopped:
    loop.train_and_evaluate(cfg, part, progress=False, data=fmnist_lt)
  assert stopped.value.status == 143
  assert signal.getsignal(signal.SIGTERM) is stop_signals[signal.SIGTERM]  # handler restored
  monkeypatch.undo()
  _same_run(loop.train_and_evaluate(cfg, part, progress=False, data=fmnist_lt), full)
  assert _rows(part) == _rows(full_wd)


# Where a stop after the last step is asked for: at the end of the last epoch (its evaluation
# and checkpoint; the stop used to be dropped there and the run finished) or during the final
# evaluation, before results.json is written.
@pytest.mark.parametrize("signum,moment", [(signal.SIGINT, "last epoch's end"),
                                           (signal.SIGTERM, "final evaluation")],
                         ids=["SIGINT-last-epochs-end", "SIGTERM-final-evaluation"])
def test_a_stop_after_the_last_step_leaves_the_results_unwritten(
    tmp_path, fmnist_lt, monkeypatch, stop_signals, full_run, signum, moment):
  full, full_wd = full_run
  cfg, part = small_config(**{"optim.batch_size": 32}), tmp_path / "part"
  name = "evaluate_task" if moment == "last epoch's end" else "final_results"
  real, calls = getattr(loop, name), []

  def hooked(*args, **kwargs):
    calls.append(1)
    if moment == "final evaluation" or len(calls) == cfg.optim.num_epochs:
      signal.raise_signal(signum)
    return real(*args, **kwargs)
  monkeypatch.setattr(loop, name, hooked)
  with pytest.raises(KeyboardInterrupt, match=r"after the last step: checkpoint saved at step "
                     rf"{full['steps']} in .*results\.json not written; rerun") as stopped:
    loop.train_and_evaluate(cfg, str(part), progress=False, data=fmnist_lt)
  assert stopped.value.status == 128 + signum
  assert not (part / "results.json").exists()
  assert max(int(s) for s in os.listdir(part / "checkpoints") if s.isdigit()) == full["steps"]
  monkeypatch.undo()
  resumed = loop.train_and_evaluate(cfg, str(part), progress=False, data=fmnist_lt)
  _same_run(resumed, full)  # evaluated from the checkpoint, not trained again
  assert _rows(part) == _rows(full_wd)


def test_a_stop_while_the_results_are_written_still_stops_the_caller(tmp_path, fmnist_lt,
                                                                     monkeypatch, stop_signals):
  # The run is finished then, but a sweep must not go on to its next run.
  real = loop.write_json_atomic

  def hooked(path, obj, *args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    return real(path, obj, *args, **kwargs)
  monkeypatch.setattr(loop, "write_json_atomic", hooked)  # the loop writes results.json only
  wd = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt, match=r"^Interrupted by SIGTERM: .*run holds the "
                     r"finished run's results\.json\.$") as stopped:
    loop.train_and_evaluate(small_config(), str(wd), progress=False, data=fmnist_lt)
  assert stopped.value.status == 143
  assert json.loads((wd / "results.json").read_text())["steps"] > 0


def _popen(args, **kw):
  return subprocess.Popen([sys.executable] + args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kw)


def test_sigterm_stops_a_run_with_143_in_one_line(tmp_path):
  wd = tmp_path / "run"
  proc = _popen(["-m", "experiments.main", f"--workdir={wd}", "--config.optim.num_epochs=300"]
                + CLI)
  t_end, metrics = time.time() + 300, wd / "metrics.jsonl"
  while (not metrics.exists() or not metrics.read_text().strip()) and proc.poll() is None \
      and time.time() < t_end:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, (out + err)[-2000:]
  assert "Traceback" not in err and len(_lines(err)) == 1, err[-2000:]
  assert _lines(err)[0].startswith("Interrupted by SIGTERM: checkpoint saved at step "), err
  step = int(_lines(err)[0].split("step ")[1].split()[0])
  assert str(step) in os.listdir(wd / "checkpoints") and not (wd / "results.json").exists()


def test_sigterm_at_start_up_exits_143_in_one_line(tmp_path):
  procs = []
  for moment in (0.8, "workdir"):  # while importing; once the work dir is claimed
    wd = tmp_path / f"run{len(procs)}"
    procs.append((moment, wd, _popen(["-m", "experiments.main", f"--workdir={wd}",
                                      "--config.optim.num_epochs=300"] + CLI)))
  t0 = time.time()
  for moment, wd, proc in procs:
    if moment == "workdir":
      while not (wd / "config.json").exists() and proc.poll() is None and time.time() < t0 + 300:
        time.sleep(0.01)
    else:
      time.sleep(max(0.0, t0 + moment - time.time()))
    proc.send_signal(signal.SIGTERM)
  for moment, _, proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (moment, (out + err)[-2000:])
    assert "Traceback" not in err and len(_lines(err)) == 1, (moment, err[-2000:])
    assert _lines(err)[0].startswith("Interrupted by SIGTERM"), (moment, err)


# A sweep whose run signals itself at its ``at``-th epoch-row evaluation (the smoke suite's CE
# run has 2 epochs: 1 = in training, 2 = its last epoch's end), at a deterministic moment.
HOOKED_SWEEP = """
import os, sys
from absl import app
from experiments import sweep
from experiments.train import loop
signum, at = int(os.environ["TEST_SIGNAL"]), int(os.environ["TEST_SIGNAL_AT"])
real, calls = loop.evaluate_task, []
def hooked(*args, **kwargs):
  calls.append(1)
  if len(calls) == at:
    os.kill(os.getpid(), signum)
  return real(*args, **kwargs)
loop.evaluate_task = hooked
app.run(sweep.main)
"""


@pytest.mark.parametrize("signum,shard,at", [
    (signal.SIGTERM, None, 1), (signal.SIGTERM, "any", 1),   # in training
    (signal.SIGINT, None, 2), (signal.SIGTERM, "any", 2),    # after the last step
], ids=["SIGTERM-training", "SIGTERM-any-training", "SIGINT-after-last-step",
        "SIGTERM-any-after-last-step"])
def test_a_stop_signal_stops_the_sweep(tmp_path, signum, shard, at):
  from experiments import sweep
  spec, suite = _suite(tmp_path)
  root = tmp_path / "root"
  args = ["-c", HOOKED_SWEEP, f"--config={spec}", f"--root={root}", "--noprogress",
          "--noreport"] + ([f"--shard={shard}"] if shard else [])
  proc = subprocess.Popen([sys.executable] + args, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
                          env=dict(_env(), TEST_SIGNAL=str(int(signum)), TEST_SIGNAL_AT=str(at)))
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 128 + signum, (out + err)[-3000:]
  assert "Traceback" not in err and len(_lines(err)) == 1, err[-3000:]
  ce = root / "runs" / "ce" / "seed0"
  word = "Interrupted" if signum == signal.SIGINT else "Interrupted by SIGTERM"
  expected = (f"{word}: checkpoint saved at step " if at == 1 else
              f"{word} after the last step: checkpoint saved at step ")
  assert _lines(err)[0].startswith(expected) and str(ce) in err, err
  assert not (ce / "results.json").exists()
  run = sweep.plan(suite)[0]
  assert sweep.run_status(str(ce), run["config"])[0] == "todo"  # a rerun resumes it
  assert not (root / "runs" / "lpa").exists()  # the sweep stopped: the next run never began
  steps = [int(s) for s in os.listdir(ce / "checkpoints") if s.isdigit()]
  spe = json.loads((ce / "metrics.jsonl").read_text().splitlines()[0])["step"]
  assert max(steps) == (spe if at == 1 else 2 * spe)
