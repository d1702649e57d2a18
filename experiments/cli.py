"""What the entry points (``main``, ``sweep``) share: errors the user can fix become one message
on stderr and an exit status; Ctrl-C (SIGINT) exits 130 and SIGTERM (a scheduler preempting the
job) 143, each saying in one line what was saved, at any moment.

Light on purpose (no JAX, no absl): the entry points import it first, so that a Ctrl-C during
their own imports already exits cleanly.  (Not run as doctests: they install signal handlers
and exit the process.)

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


# The signals that stop a run as Ctrl-C does: a cluster scheduler preempts a job with SIGTERM
# (SIGKILL follows a grace period later), and the work since the last checkpoint must not be
# lost to it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
  """The shell's status for a process a signal stopped: 130 for SIGINT, 143 for SIGTERM, so a
  job script can tell a preemption from a Ctrl-C.

  >>> exit_status(signal.SIGINT), exit_status(signal.SIGTERM)
  (130, 143)
  """
  return 128 + int(signum)


def stopped_by(signum: int) -> str:
  """How a stop's message begins: ``'Interrupted'`` (Ctrl-C) or ``'Interrupted by SIGTERM'``.

  >>> stopped_by(signal.SIGTERM)
  'Interrupted by SIGTERM'
  """
  return "Interrupted" if signum == signal.SIGINT else \
      f"Interrupted by {signal.Signals(signum).name}"


def _reworded(message: str, signum: int) -> str:
  # The start-up notes are written for Ctrl-C; say which signal it was.
  return stopped_by(signum) + message.removeprefix("Interrupted") \
      if message.startswith("Interrupted") else message


class Interrupted(KeyboardInterrupt):
  """A stop asked for by a signal (:data:`STOP_SIGNALS`); its message, if any, says what was
  saved, and ``status`` is the exit status to end with (:func:`exit_status`).  A
  ``KeyboardInterrupt``, so code that handles Ctrl-C handles SIGTERM alike."""

  def __init__(self, message: str = "", signum: int = signal.SIGINT):
    super().__init__(*([message] if message else []))
    self.signum, self.status = int(signum), exit_status(signum)


def exit_on_interrupt(describe) -> None:
  """Makes Ctrl-C and SIGTERM print ``describe()`` and exit at once (130, 143), until the
  training loop installs its own handler (which stops at a step boundary with a checkpoint)
  and after it restores this one; a signal that is ignored stays ignored.  Raising
  ``KeyboardInterrupt`` instead would let a library's ``except:`` swallow it, or interrupt a
  C extension half-way through its initialisation."""
  def handle(signum, frame):
    try:
      message = describe()
    except Exception:  # noqa: BLE001 - e.g. still importing: nothing done yet
      message = "Interrupted while starting: nothing was saved."
    _exit(exit_status(signum), f"\n{_reworded(message, signum)}")
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in STOP_SIGNALS:
    # An inherited SIG_IGN (a job started with `&` or nohup) is kept, as Python itself keeps it.
    if signal.getsignal(signum) is not signal.SIG_IGN:
      signal.signal(signum, handle)


def define_config(default: str, help_text: str) -> None:
  """``config_flags.DEFINE_config_file("config", ...)``, after checking that every
  ``--config.a.b=v`` override names a field of the config: ml_collections resolves them as the
  flag is defined or parsed, and a misspelt one fails there under a 40-line traceback.  One
  line names the field and the nearest existing ones instead (``--traceback``: the
  traceback)."""
  from ml_collections import config_flags
  if "--traceback" not in sys.argv:
    try:
      message = unknown_field(sys.argv, default)
    except Exception:  # noqa: BLE001 - e.g. no such config file: ml_collections says so
      message = None
    if message is not None:
      _exit(1, message)
  config_flags.DEFINE_config_file("config", default, help_text)


def _config_spec(argv, default: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def unknown_field(argv, default: str) -> str | None:
  """``Error: ...`` for the first ``--config.<field>`` override in ``argv`` that names no field
  of the config (``--config=`` in ``argv``, else ``default``), with the nearest fields; None
  when every override names one.

  >>> unknown_field(["--config.optim.lrr=0.1"], "experiments/configs/longtail.py:quick")
  "Error: config.optim has no field 'lrr' (--config.optim.lrr=0.1); did you mean config.optim.lr?"
  """
  import difflib
  import importlib.util
  path, _, arg = _config_spec(argv, default).partition(":")
  spec = importlib.util.spec_from_file_location("lpa_config_for_error", path)
  if spec is None or spec.loader is None:
    return None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for flag in argv:
    if not flag.startswith("--config."):
      continue
    node, parts = config, flag.split("=", 1)[0][len("--config."):].split(".")
    for i, part in enumerate(parts):
      where = ".".join(["config"] + parts[:i])
      if not hasattr(node, "keys"):
        return (f"Error: {where} is a {type(node).__name__}, it has no field {part!r} "
                f"({flag})")
      if part not in node:
        keys = [str(k) for k in node.keys()]
        near = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(f'{where}.{k}' for k in near)}?" if near
                else f"its fields are: {', '.join(sorted(keys))}")
        return f"Error: {where} has no field {part!r} ({flag}); {hint}"
      node = node[part]
  return None


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
  from experiments.data.sources import CacheUnreadable, DataCorrupt, DataNotFound
  from experiments.train.checkpoint import CheckpointMismatch, NoUsableCheckpoint
  from experiments.train.history import HistoryDamaged
  from experiments.train.lock import Busy
  from experiments.train.workdir import ConfigMismatch, disk_full, no_access
  cause = disk_full(e)
  if cause is not None:
    # A full disk fails deep inside orbax or the writers, under hundreds of lines of
    # traceback: say what happened, and only that.
    return (f"Error: no space left on device while writing the run ({cause}). Free space "
            "and rerun the same command: it resumes from the last checkpoint.")
  known = (ConfigMismatch, CheckpointMismatch, NoUsableCheckpoint, InvalidConfig, Busy,
           HistoryDamaged, CacheUnreadable, DataNotFound, DataCorrupt,
           FloatingPointError) + tuple(extra_types)
  if isinstance(e, known):
    return f"Error: {e}"  # says what is wrong and what to do; a traceback would bury it
  denied = no_access(e)
  if denied is not None:  # a read-only work dir or cache: the path says which
    return (f"Error: cannot write {denied}. Choose a work dir (--workdir; a sweep's --root) "
            "and a data cache (data.cache_dir or LPA_CACHE_DIR) this user can write to.")
  return None


def run_guarded(body, show_traceback: bool, interrupted, statuses=None):
  """``body()``; a Ctrl-C exits 130 (SIGTERM: 143, :class:`Interrupted`) with the loop's message
  (else ``interrupted()``), a user error exits with one message (status 1, or
  ``statuses[type]``).  ``show_traceback`` re-raises user errors too."""
  statuses = statuses or {}
  try:
    return body()
  except KeyboardInterrupt as e:
    signum = getattr(e, "signum", signal.SIGINT)
    # An exception object is always truthy: test its text, which is empty for a bare Ctrl-C.
    _exit(exit_status(signum), f"\n{str(e) or _reworded(interrupted(), signum)}")
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
