"""Paired statistics between two methods of one suite: per-seed differences with a 95 %
t-interval, and McNemar's test on the per-sample test predictions pooled over the seeds.

Runs of a suite share the data (``data.seed`` fixed) and differ between methods only in the
method, so the run of method A with seed k and the run of method B with seed k form a pair.

>>> d = paired_difference({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.78, 1: 0.80, 2: 0.80})
>>> round(d["mean"], 4), d["n"]
(0.0167, 3)
>>> mcnemar([1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1])["b"]
1
"""
from __future__ import annotations

import math

import numpy as np


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict:
  """``a − b`` over the seeds both have (``{seed: value}``): ``n``, ``mean``, ``std`` (ddof
  1) and the ``level`` t-interval ``lo``, ``hi`` (NaN for fewer than two pairs)."""
  from scipy import stats
  seeds = sorted(set(a) & set(b))
  d = np.asarray([a[s] - b[s] for s in seeds], float)
  out = {"n": len(d), "seeds": seeds, "mean": float(d.mean()) if len(d) else math.nan,
         "std": math.nan, "lo": math.nan, "hi": math.nan}
  if len(d) >= 2:
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * std / math.sqrt(len(d))
    out.update(std=std, lo=out["mean"] - half, hi=out["mean"] + half)
  return out


def mcnemar(pred_a, pred_b, label) -> dict:
  """McNemar's exact test on paired per-sample predictions: ``b`` = samples A gets right and
  B wrong, ``c`` = the reverse, ``p`` the two-sided binomial p-value of ``b`` given ``b + c``
  (1.0 when they never disagree)."""
  from scipy import stats
  a_ok = np.asarray(pred_a) == np.asarray(label)
  b_ok = np.asarray(pred_b) == np.asarray(label)
  b, c = int(np.sum(a_ok & ~b_ok)), int(np.sum(~a_ok & b_ok))
  p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
  return {"b": b, "c": c, "n": int(a_ok.size), "p": p}
