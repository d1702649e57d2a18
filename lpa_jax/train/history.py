"""Per-epoch metrics: the running epoch average and the ``metrics.jsonl`` history.

  >>> log = MetricLog(); log.add({"loss": np.float32(1.0)}); log.flush()
  {'loss': 1.0}
"""
from __future__ import annotations

import json
import os

import numpy as np


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


def trim_history(path: str, step: int) -> list[dict]:
  """Keeps the rows of epochs finished by ``step`` (those after it are redone on resume) and
  rewrites ``metrics.jsonl`` atomically; returns the kept rows."""
  rows = [r for r in read_history(path) if r.get("step", 0) <= step] if step else []
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)
  return rows


def append_row(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
