"""How several sweep processes share one suite root: ``--shard=I/N`` (a fixed slice of the
plan each) or ``--shard=any`` (each takes the next run no other process is training).

  >>> parse_shard("1/2"), lock_name((1, 2))
  ((1, 2), '.lock-shard-1-of-2')
"""
from __future__ import annotations

import contextlib
import os


ANY = (0, 0)  # --shard=any: every run, each taken by whichever process reaches it first


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
