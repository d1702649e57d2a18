"""Per-epoch metrics: the running epoch average and the ``metrics.jsonl`` history.

  >>> log = MetricLog(); log.add({"loss": np.float32(1.0)}); log.flush()
  {'loss': 1.0}
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np


class HistoryDamaged(ValueError):
  """``metrics.jsonl`` lacks rows of epochs the checkpoint has finished, with no copy to
  restore them from."""


class MetricLog:
  """Per-epoch means of the step metrics; per-class vectors (``*_C``) weighted by presence."""

  def __init__(self, rows=None):
    self.rows = list(rows or [])

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


def read_history(path: str) -> list[dict]:
  """The rows of ``metrics.jsonl``; a torn last line (a kill mid-write) is dropped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def update_best(best, row):
  """Model selection by in-domain validation accuracy (DomainBed's training-domain rule)."""
  if "val_accuracy" not in row:
    return best
  if best is None or row["val_accuracy"] > best["val_accuracy"]:
    return {k: row[k] for k in ("epoch", "val_accuracy", "test_accuracy") if k in row}
  return best


def best_of(rows) -> dict | None:
  best = None
  for row in rows:
    best = update_best(best, row)
  return best


def to_json_rows(rows: list[dict]) -> list[dict]:
  """Step metrics fetched from the device as JSON values (float32 -> float is exact, so a
  partly done epoch saved in a checkpoint averages to the same bits after a resume)."""
  return [{k: np.asarray(v).tolist() for k, v in r.items()} for r in rows]


def _lines(path: str, step: int) -> list[str]:
  """The lines of the rows of epochs finished by ``step``, as :func:`read_history` reads them."""
  if not step or not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        break
      if row.get("step", 0) <= step:
        out.append(line.rstrip("\n"))
  return out


def resume_history(path: str, step: int, steps_per_epoch: int, saved: list[str] | None,
                   write: bool = True) -> list[str]:
  """The lines of ``metrics.jsonl`` for the epochs finished by checkpoint ``step`` (the rows
  after it are redone on resume), checked against ``saved``, the copy that checkpoint holds;
  with ``write``, the file is rewritten atomically to hold exactly them.

  A file that disagrees with the copy (deleted, a row torn or lost in the middle, rows written
  twice) is restored from it, with a warning.  A checkpoint without a copy (older versions)
  only passes a file holding each finished epoch once, in order; else :class:`HistoryDamaged`.

  >>> resume_history("/tmp/none/metrics.jsonl", 0, 10, None, write=False)
  []
  """
  lines = _lines(path, step)
  if saved is not None:
    if lines != saved:
      warnings.warn(f"{path} does not match the history saved with the checkpoint at step "
                    f"{step} ({len(lines)} good rows in the file, {len(saved)} saved: deleted, "
                    "torn or written twice); restored the saved rows.", stacklevel=2)
      lines = list(saved)
  else:
    epochs = [json.loads(x).get("epoch") for x in lines]
    if epochs != list(range(1, step // steps_per_epoch + 1)):
      raise HistoryDamaged(
          f"{path} lacks rows of the epochs finished by the checkpoint at step {step} (it holds "
          f"epochs {epochs}, expected 1..{step // steps_per_epoch}), and that checkpoint holds "
          "no copy to restore them from. Put the file back, or start afresh with --fresh.")
  if write:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(x + "\n" for x in lines)
    os.replace(tmp, path)
  return lines


def append_row(path: str | None, row: dict) -> str:
  """Appends ``row`` to ``metrics.jsonl`` (``path=None``: writes nothing); returns its line,
  which the checkpoints keep as the history's durable copy."""
  line = json.dumps(row)
  if path is not None:
    with open(path, "a") as f:
      f.write(line + "\n")
  return line
