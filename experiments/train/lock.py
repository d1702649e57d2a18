"""One process at a time per work dir (or sweep root): an exclusive ``flock`` on a lock file.

The file records its holder (pid, host, start time) so that a second process is refused at
once with a message naming it.  The kernel drops the lock when its holder dies, however it
dies, so a lock file left by a killed process is simply taken over (its stale record is
replaced).  Within one process the lock is re-entrant: a sweep that holds a run's work dir may
call the loop on it, which takes the same lock again.

  >>> import tempfile
  >>> workdir = tempfile.mkdtemp()     # e.g. "runs/lt"
  >>> with hold(workdir):              # a second process here raises Busy
  ...   sorted(holder(f"{workdir}/.lock"))
  ['host', 'pid', 'started']
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # path -> [fd, depth]: the locks this process holds


class Busy(RuntimeError):
  """Another live process holds the lock."""


def holder(path: str) -> dict | None:
  """The record in lock file ``path`` (``pid``, ``host``, ``started``), or None if unreadable.

  >>> holder("/nonexistent/.lock") is None
  True
  """
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def describe(record: dict | None) -> str:
  """``'pid 12 on host h, started 2025-01-02 03:04:05'`` (or a note that it is unknown)."""
  if not record:
    return "a process that has not yet recorded itself"
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
  return f"pid {record.get('pid')} on host {record.get('host')}, started {started}"


def _try_lock(path: str) -> int | None:
  """An fd holding ``path``'s flock, or None when another process holds it.

  The lock file is deleted on release; a process that opened it just before the deletion
  would lock a dead inode, so after locking we check the path still names our file.
  """
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
        return None
      raise
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)  # released and deleted while we waited: try the new file


def _record(fd: int) -> None:
  text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
  os.ftruncate(fd, 0)
  os.pwrite(fd, text.encode(), 0)


@contextlib.contextmanager
def hold(directory: str, name: str = LOCK_FILE, what: str = "Work dir"):
  """Holds ``directory/name`` for this process (creating ``directory``); raises :class:`Busy`
  naming the holder when another live process has it.  ``what`` names the directory in the
  message.

  >>> with hold("/tmp/lock_doc"):
  ...   pass
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.abspath(os.path.join(directory, name))
  if path in _held:
    _held[path][1] += 1
  else:
    fd = _try_lock(path)
    if fd is None:
      raise Busy(f"{what} {directory} is in use by {describe(holder(path))} (lock file "
                 f"{path}). Wait for that process to finish, or stop it, then rerun.")
    _record(fd)
    _held[path] = [fd, 1]
  try:
    yield
  finally:
    _release(path)


def _release(path: str) -> None:
  entry = _held[path]
  entry[1] -= 1
  if entry[1]:
    return
  del _held[path]
  with contextlib.suppress(OSError):
    os.remove(path)  # while still locked: see _try_lock
  os.close(entry[0])
