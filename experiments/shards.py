"""How several sweep processes share one suite root: ``--shard=I/N`` (a fixed slice of the
plan each) or ``--shard=any`` (each takes the next run no other process is training), all of
one plan: ``suite.json`` records it, and a sweep of another plan is refused (:func:`plan_diff`).

  >>> parse_shard("1/2"), lock_name((1, 2))
  ((1, 2), '.lock-shard-1-of-2')
"""
from __future__ import annotations

import contextlib
import json
import os
import time


ANY = (0, 0)  # --shard=any: every run, each taken by whichever process reaches it first
PLAN_LOCK = ".lock-plan"


def parse_shard(text: str | None) -> tuple[int, int]:
  """``"1/2"`` -> ``(1, 2)``; ``None`` -> ``(0, 1)`` (every run); ``"any"`` -> :data:`ANY`.

  >>> parse_shard("1/2"), parse_shard("any")
  ((1, 2), (0, 0))
  """
  if text is None:
    return 0, 1
  if text == "any":
    return ANY
  try:
    i, n = (int(p) for p in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard must be I/N with integers, e.g. 0/2; got {text!r}") from None
  if not (n >= 1 and 0 <= i < n):
    raise ValueError(f"--shard={text}: need N >= 1 and 0 <= I < N")
  return i, n


def lock_name(shard: tuple[int, int] = (0, 1)) -> str:
  """The suite root's lock file for ``shard``: sweeps of other shards of one root run at the
  same time (their runs are disjoint, and each run's work dir has its own lock), two of the
  same shard do not.

  >>> lock_name((1, 4)), lock_name()
  ('.lock-shard-1-of-4', '.lock')
  """
  return ".lock" if shard == (0, 1) else f".lock-shard-{shard[0]}-of-{shard[1]}"


def root_lock(root: str, shard: tuple[int, int]):
  """The suite root's lock: none for :data:`ANY` (its processes share the root; each run's
  work-dir lock keeps two of them off one run)."""
  from experiments.train.lock import hold
  if shard == ANY:
    os.makedirs(root, exist_ok=True)
    return contextlib.nullcontext()
  return hold(root, lock_name(shard), what="Suite root")


def _plain(value):
  return json.loads(json.dumps(value, default=list))  # tuples as lists, as suite.json has them


def plan_diff(recorded, planned: dict) -> list[tuple[str, object, object]]:
  """``(field, recorded, planned)`` for each way the plan in ``recorded`` (a ``suite.json``)
  differs from ``planned``: ``suite``, ``task``, ``overrides.<key>``, ``methods[<name>]`` (a
  method on one side only) or ``methods[<name>].<key>``; ``'<absent>'`` marks a missing side.
  These fields make the plan; the description, seeds and machine do not (a sweep of other
  seeds of one plan adds to it).  A record without them (none yet, or not a sweep's) differs
  in nothing.

  >>> plan_diff({"task": "a.py", "overrides": [["optim.lr", 0.1]]},
  ...           {"task": "a.py", "overrides": [["optim.lr", 0.2]], "methods": []})
  [('overrides.optim.lr', 0.1, 0.2)]
  """
  if not isinstance(recorded, dict):
    return []
  a, b = _plain(recorded), _plain(planned)
  out = [(k, a[k], b.get(k, "<absent>")) for k in ("suite", "task")
         if k in a and a[k] != b.get(k, "<absent>")]

  def keyed(items, key):  # overrides: [[k, v], ...] (or a dict); methods: [{name, ...}, ...]
    if isinstance(items, dict):
      return items
    return ({m.get("name"): m for m in items if isinstance(m, dict)} if key == "methods"
            else {k: v for k, v in items})
  for field in ("overrides", "methods"):
    if field not in a:
      continue
    old, new = keyed(a[field], field), keyed(b.get(field, []), field)
    for k in sorted(set(old) | set(new), key=str):
      if old.get(k) == new.get(k):
        continue
      if field == "overrides":
        out.append((f"overrides.{k}", old.get(k, "<absent>"), new.get(k, "<absent>")))
      elif k not in old or k not in new:  # a method on one side only
        out.append((f"methods[{k!r}]", old.get(k, "<absent>"), new.get(k, "<absent>")))
      else:
        out += [(f"methods[{k!r}].{f}", old[k].get(f, "<absent>"), new[k].get(f, "<absent>"))
                for f in sorted(set(old[k]) | set(new[k]))
                if old[k].get(f, "<absent>") != new[k].get(f, "<absent>")]
  return out


@contextlib.contextmanager
def plan_lock(root: str, wait_s: float = 120.0):
  """Holds the suite root's plan lock while a sweep checks and writes ``suite.json``: sweeps
  started together (``--shard=any`` processes, shards) take turns, so the second of two plans
  finds the first's record.  Waits up to ``wait_s`` for the holder (it holds it for
  milliseconds), then raises :class:`~experiments.train.lock.Busy` naming it."""
  from experiments.train.lock import Busy, hold
  t_end = time.monotonic() + wait_s
  with contextlib.ExitStack() as stack:
    while True:
      try:
        stack.enter_context(hold(root, PLAN_LOCK, what="Suite root (its plan)"))
        break
      except Busy:
        if time.monotonic() > t_end:
          raise
        time.sleep(0.05)
    yield
