"""What the entry points (``main``, ``sweep``) share: errors the user can fix become one message
on stderr and an exit status, Ctrl-C exits 130 saying what was saved, at any moment.

Light on purpose (no JAX, no absl): the entry points import it first, so that a Ctrl-C during
their own imports already exits cleanly.

  >>> exit_on_interrupt(lambda: "Interrupted before training started.")    # doctest: +SKIP
  >>> run_guarded(lambda: train(...), show_traceback=False,                 # doctest: +SKIP
  ...             interrupted=lambda: "Interrupted.")
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings


def _exit(status: int, message: str):
  """Prints ``message`` and ends the process now: exit handlers (TensorBoard's writer thread,
  orbax's) would only print their own tracebacks of the same failure after it."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def exit_on_interrupt(describe) -> None:
  """Makes Ctrl-C print ``describe()`` and exit 130 at once, until the training loop installs
  its own handler (which stops at a step boundary with a checkpoint) and after it restores
  this one; a no-op where SIGINT is ignored.  Raising ``KeyboardInterrupt`` instead would let
  a library's ``except:`` swallow it, or interrupt a C extension half-way through its
  initialisation."""
  def handle(signum, frame):
    try:
      message = describe()
    except Exception:  # noqa: BLE001 - e.g. still importing: nothing done yet
      message = "Interrupted while starting: nothing was saved."
    _exit(130, f"\n{message}")
  # An inherited SIG_IGN (a job started with `&` or nohup) is kept, as Python itself keeps it.
  if threading.current_thread() is threading.main_thread() and \
      signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, handle)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in ``workdir`` (orbax's temporary dirs are not steps).

  >>> checkpoint_steps("/nonexistent")
  []
  """
  try:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  except OSError:
    return []


def saved_note(workdir: str | None) -> str:
  """What a Ctrl-C outside the training loop leaves in ``workdir``, in one line.

  >>> saved_note("/nonexistent")
  'Interrupted before training started: nothing was saved in /nonexistent.'
  """
  if workdir is None:
    return "Interrupted before training started: nothing was saved."
  if os.path.exists(os.path.join(workdir, "results.json")):
    return f"Interrupted: {workdir} holds the finished run's results.json."
  steps = checkpoint_steps(workdir)
  if steps:
    return (f"Interrupted: {workdir} resumes from its checkpoint at step {steps[-1]}; rerun the "
            "same command to resume.")
  return f"Interrupted before training started: nothing was saved in {workdir}."


def one_line_warnings() -> None:
  """Warnings (e.g. a corrupt checkpoint skipped for an older one) as ``Warning: ...`` lines,
  without the source line Python adds."""
  warnings.formatwarning = lambda message, category, *args, **kwargs: f"Warning: {message}\n"


def user_error(e: BaseException, extra_types=()) -> str | None:
  """The one message to show for an error whose cause the user can fix, else None (a bug:
  its traceback is wanted).  ``extra_types``: more such error classes of the caller."""
  from experiments.configs.common import InvalidConfig
  from experiments.data.sources import CacheUnreadable
  from experiments.train.checkpoint import CheckpointMismatch, NoUsableCheckpoint
  from experiments.train.history import HistoryDamaged
  from experiments.train.lock import Busy
  from experiments.train.workdir import ConfigMismatch, disk_full
  cause = disk_full(e)
  if cause is not None:
    # A full disk fails deep inside orbax or the writers, under hundreds of lines of
    # traceback: say what happened, and only that.
    return (f"Error: no space left on device while writing the run ({cause}). Free space "
            "and rerun the same command: it resumes from the last checkpoint.")
  known = (ConfigMismatch, CheckpointMismatch, NoUsableCheckpoint, InvalidConfig, Busy,
           HistoryDamaged, CacheUnreadable, FloatingPointError) + tuple(extra_types)
  if isinstance(e, known):
    return f"Error: {e}"  # says what is wrong and what to do; a traceback would bury it
  return None


def run_guarded(body, show_traceback: bool, interrupted, statuses=None):
  """``body()``; a Ctrl-C exits 130 with the loop's message (else ``interrupted()``), a user
  error exits with one message (status 1, or ``statuses[type]``).  ``show_traceback`` re-raises
  user errors too."""
  statuses = statuses or {}
  try:
    return body()
  except KeyboardInterrupt as e:
    # An exception object is always truthy: test its text, which is empty for a bare Ctrl-C.
    _exit(130, f"\n{str(e) or interrupted()}")
  except Exception as e:  # noqa: BLE001 - errors with their own message; the rest re-raise
    message = None if show_traceback else user_error(e, tuple(statuses))
    if message is None:
      raise
    _exit(next((s for t, s in statuses.items() if isinstance(e, t)), 1), message)


def progress_bar(total: int, desc: str, progress: bool):
  """A tqdm bar over ``total`` items (one that shows nothing without tqdm or ``progress``)."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    from experiments.train.loop import NoBar
    return NoBar()
  return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)


def say(line: str) -> None:
  """Prints ``line`` above any progress bar."""
  try:
    from tqdm.auto import tqdm
    tqdm.write(line)
  except ImportError:  # pragma: no cover
    print(line, flush=True)
